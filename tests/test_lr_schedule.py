"""``model.lr_schedule``: the paper's constant Adam step, a half-cosine fall to ``lr_floor``, or a step size
per group that grows while its loss falls (``adaptive``)."""
import math

import lightning as L
import pytest
import torch

from conftest import fit


def _fit_recording(tmp_path, name: str, record: L.Callback, *options: str) -> None:
    """A tiny fit (nothing stops: stop loss 0) with ``record`` among its callbacks."""
    from lafn_lightning.api.settings import LafnCLI
    from conftest import CONFIGS

    cli = LafnCLI(["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / name), "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                   "--trainer.default_root_dir", str(tmp_path), "--model.stop_loss", "0", *options], run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


class _Rates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, module, *args):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_falls_from_lr_to_the_floor_over_max_steps(tmp_path):
    runs = {}
    for schedule in ("constant", "cosine"):
        record = _Rates()
        _fit_recording(tmp_path, schedule, record, "--trainer.max_steps", "6", "--model.lr", "0.4",
                       "--model.lr_schedule", schedule, "--model.lr_floor", "0.25")
        runs[schedule] = record.rates
    assert runs["constant"] == [0.4] * 6
    expected = [0.4 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * k / 6))) for k in range(6)]
    assert runs["cosine"] == pytest.approx(expected)
    assert runs["cosine"][0] == pytest.approx(0.4) and runs["cosine"][-1] < runs["cosine"][1]


def test_unknown_schedule_and_floor_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(tmp_path, "--model.lr_schedule", "linear", "--trainer.fast_dev_run", "true")
    with pytest.raises(ValueError, match="lr_floor"):
        fit(tmp_path, "--model.lr_floor", "2", "--trainer.fast_dev_run", "true")


class _Steps(L.Callback):
    """ΔV, step sizes and last measured losses after every optimisation step."""

    def __init__(self):
        self.delta, self.size, self.loss = [], [], []

    def on_train_batch_end(self, trainer, module, *args):
        self.delta.append(module.delta_v.detach().clone())
        self.size.append(module.step_size.clone())
        self.loss.append(module.last_loss.clone())


def test_adaptive_scales_each_groups_adam_step_by_its_own_step_size(tmp_path):
    """Step 1 is Adam's (size 1); at step 2 every group's gradient and Adam state equal the constant
    run's, so its ΔV moves by its step size times the constant run's move: lr_up where its own loss
    fell since step 1, lr_down where it rose."""
    runs = {}
    for schedule in ("constant", "adaptive"):
        record = _Steps()
        _fit_recording(tmp_path, schedule, record, "--trainer.max_steps", "2", "--model.lr", "2.0",
                       "--model.lr_schedule", schedule, "--model.lr_up", "1.5", "--model.lr_down", "0.25")
        runs[schedule] = record
    const, adapt = runs["constant"], runs["adaptive"]
    assert len(adapt.delta) == 2 and torch.equal(adapt.size[0], torch.ones_like(adapt.size[0]))
    assert torch.allclose(adapt.delta[0], const.delta[0])
    fell = adapt.loss[1] < adapt.loss[0]
    expected = torch.where(fell, 1.5, 0.25)
    assert torch.equal(adapt.size[1], expected)
    moved = adapt.delta[1] - adapt.delta[0]
    assert moved.abs().amax() > 0
    assert torch.allclose(moved, expected[:, None, None] * (const.delta[1] - const.delta[0]), atol=1e-6)


def test_bad_adaptive_options_are_refused_with_their_key(tmp_path):
    for key, value in (("lr_up", "0.9"), ("lr_down", "0"), ("lr_down", "1.5"), ("lr_max", "0.5")):
        with pytest.raises(ValueError, match=f"model.{key}="):
            fit(tmp_path, f"--model.{key}", value, "--trainer.fast_dev_run", "true")
