"""The per-language stopping rule: a 12-language group stops only once every language is below the threshold."""
import lightning as L
import pytest
from lafn_lightning.api.settings import LafnCLI
import torch

from conftest import CONFIGS, fit
from lafn_lightning import EditCache
from lafn_lightning.routing.keys import KEYS_FILE, KeyStore


class _Record(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, *args):
        self.steps.append((module.final_language_loss[0].clone(), bool(module.stopped[0])))


def test_every_language_rule_waits_for_the_slowest_language(tmp_path, dev_data):
    # tiny-llama learns slowly: its languages' losses spread around 6-7 nats, enough to place a
    # threshold that the mean passes at once and the worst language only after some steps.
    record = _Record()

    stop = 6.6
    cli = LafnCLI(["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--data.dataset", str(dev_data),
                    "--data.languages", "null", "--data.groups", "0:1", "--locate.strategy", "all",
                    "--model.stop_rule", "every_language", "--model.stop_loss", str(stop),
                    "--trainer.max_steps", "30"], run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = torch.stack([l for l, _ in record.steps])           # [steps, languages]
    assert losses.shape[1] == 12 and not torch.isnan(losses).any()
    worst, mean = losses.amax(1), losses.mean(1)
    stopped_at = next(i for i, (_, s) in enumerate(record.steps) if s)
    assert stopped_at == len(record.steps) - 1                   # the fit ended when the group stopped
    assert worst[stopped_at] < stop                              # every language below ...
    assert (worst[:stopped_at] >= stop).all()                    # ... and not before
    assert stopped_at > 0 and mean[0] < stop                     # the paper's mean rule would have stopped at step 1
    assert int(cli.model.steps[0]) == stopped_at + 1


def test_mean_rule_is_the_default_and_stops_on_the_mean(tmp_path):
    cli = fit(tmp_path, "--data.languages", "null", "--data.groups", "0:1", "--locate.strategy", "all",
              "--model.stop_loss", "6.7", "--trainer.max_steps", "30", "--data.num_prefixes", "2")
    assert cli.model.hparams.stop_rule == "mean"
    assert int(cli.model.steps[0]) == 1 and bool(cli.model.stopped[0])


@pytest.mark.parametrize("option, value", [("stop_rule", "median"), ("drop_below", "0"), ("drop_below", "1.5"),
                                           ("full_every", "0"), ("converged_prompts", "-1")])
def test_bad_stop_options_are_refused_with_their_key(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"model.{option}"):
        fit(tmp_path, f"--model.{option}", value, "--trainer.fast_dev_run", "true")


def test_twelve_language_preset_reaches_the_fit_and_the_cache(tmp_path, dev_data):
    """``-c presets/twelve_languages`` after a backbone config: every language, the every-language
    stop rule, loss weighting, beta 0.1, routed sites and the bare prompt reach the fit and its cache settings, and
    the router's further lexical tiers reach the key file."""
    cli = fit(tmp_path, "-c", str(CONFIGS / "presets" / "twelve_languages.yaml"), "--data.dataset", str(dev_data),
              "--data.groups", "0:1", "--trainer.max_steps", "2",
              "--model.layers", "[1, 2]")                       # the preset's layers are the demo's
    assert list(cli.model.hparams.layers) == [1, 2]
    assert cli.datamodule.hparams.subject_site == "routed"
    settings = EditCache.open(tmp_path / "cache").settings
    assert len(settings["languages"]) == 12
    assert (settings["stop_rule"], settings["language_weighting"], settings["beta"]) == ("every_language", "loss", 0.1)
    assert settings["bare_prompt"] is True and cli.datamodule.prefixes["en"][0] == ""
    assert KeyStore.load(tmp_path / "cache" / KEYS_FILE).lexical_tiers == [[0.7, 0.6], [0.5, 0.9795, 1.0]]   # the router's tiers


def _dropping_fit(tmp_path, dev_data, stop: float, *extra: str):
    """An unrun 12-language, one-group tiny fit with the every-language rule and ``drop_converged``."""
    return LafnCLI(["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / "cache"), "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.default_root_dir", str(tmp_path), "--data.dataset", str(dev_data),
                    "--data.languages", "null", "--data.groups", "0:1", "--locate.strategy", "all",
                    "--model.stop_rule", "every_language", "--model.stop_loss", str(stop),
                    "--model.drop_converged", "true", "--trainer.max_steps", "30", *extra], run=False)


@pytest.mark.parametrize("below", [1.0, 0.99])
def test_converged_languages_leave_the_step_and_the_group_stops_on_a_full_step(tmp_path, dev_data, below):
    """``model.drop_converged``: a language below ``stop_loss * drop_below`` runs no rows until the
    group's next full step (every ``full_every`` steps, or when its latest losses would stop it);
    the group stops only on a step where every language ran and each was below the stop loss."""
    stop, every = 6.6, 3
    cli = _dropping_fit(tmp_path, dev_data, stop, "--model.full_every", str(every), "--model.drop_below", str(below))
    module, steps = cli.model, []
    losses = module.losses

    def spy(batch, active=None, cells=None):
        before = module.final_language_loss[0].clone()
        out = losses(batch, active, cells)
        ran = batch["language"][out["rows"]].unique().tolist()
        steps.append((before, sorted(ran), out["language_target"][0].clone()))
        return out

    module.losses = spy
    cli.trainer.fit(module, datamodule=cli.datamodule)
    full = [len(ran) == 12 for _, ran, _ in steps]
    assert full[0] and not all(full)                        # languages left some steps ...
    for before, ran, _ in steps[1:]:
        if len(ran) < 12:                                    # ... exactly those below the stop loss
            assert sorted(ran) == (before >= stop * below).nonzero().squeeze(1).tolist()
    if below < 1:   # a language between the two thresholds stayed in a partial step
        assert any(len(ran) < 12 and ((before >= stop * below) & (before < stop))[ran].any() for before, ran, _ in steps)
    assert all(any(full[i:i + every + 1]) for i in range(len(full) - every))   # a full step at least every `every`
    assert bool(module.stopped[0]) and full[-1]              # stopped on a full step ...
    assert steps[-1][2].amax() < stop                        # ... with every language below the stop loss
    for (_, ran, loss), f in zip(steps[:-1], full[:-1]):
        assert not (f and loss.amax() < stop)                # and on the first full step that met it


def test_a_converged_language_keeps_its_first_prompts(tmp_path, dev_data):
    """``model.converged_prompts 1``: on a partial step a converged language runs its first prompt
    only, the others every prompt."""
    stop = 6.6
    cli = _dropping_fit(tmp_path, dev_data, stop, "--model.converged_prompts", "1")
    module, steps = cli.model, []
    losses = module.losses

    def spy(batch, active=None, cells=None):
        before = module.final_language_loss[0].clone()
        out = losses(batch, active, cells)
        rows = out["rows"]
        per_lang = torch.bincount(batch["language"][rows], minlength=12)
        steps.append((before, per_lang))
        return out

    module.losses = spy
    cli.trainer.fit(module, datamodule=cli.datamodule)
    prompts = cli.datamodule.hparams.num_prefixes
    partial = [(b, n) for b, n in steps[1:] if (n < prompts).any()]
    assert partial                                          # some steps ran fewer rows
    for before, per_lang in partial:
        converged = before < stop
        assert (per_lang[converged] == 1).all() and (per_lang[~converged] == prompts).all()
