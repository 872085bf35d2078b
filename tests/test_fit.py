"""Fitting ΔV with Lightning on tiny random models of every FFN family."""
import pytest
import torch

from conftest import fit
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.cache import EditCache


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bloom", "gpt2"])
def test_fast_dev_run_every_ffn_family(tmp_path, family):
    cli = fit(tmp_path, "--model.backbone", f"tiny-{family}", "--trainer.fast_dev_run", "true")
    module = cli.model
    dv = module.delta_v.detach()
    assert module.located and module.mask.any()
    assert int(module.steps.max()) == 1                      # one optimisation step ran
    assert dv[module.mask].abs().sum() > 0                   # ... and moved ΔV on the located neurons
    assert torch.equal(dv[~module.mask], torch.zeros_like(dv[~module.mask]))
    assert not (tmp_path / "cache").exists()                 # fast_dev_run never exports


def test_fit_touches_only_delta_v(tmp_path):
    model, _ = load_backbone("tiny-qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cli = fit(tmp_path, "--model.backbone", "tiny-qwen2", "--trainer.max_steps", "4",
              "--trainer.enable_checkpointing", "true")
    module = cli.model
    # ΔV is the only trainable parameter; the backbone got no gradient and is bit-identical.
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["delta_v"]
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ΔV is exactly zero off the mask in what is exported.
    final = module.final_delta()
    assert torch.equal(final[~module.mask], torch.zeros_like(final[~module.mask]))
    assert final.abs().sum() > 0
    # The checkpoint holds ΔV, masks and progress, never a backbone tensor.
    ckpt_path = cli.trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert set(state) == {"delta_v", "mask", "located", "stopped", "steps", "final_target_loss", "frozen"}
    assert sum(t.numel() for t in state.values()) < 10 * module.delta_v.numel()


def test_loss_decreases_and_groups_are_independent(tmp_path):
    """The target loss falls; a group's ΔV does not depend on which other groups share the batch."""
    both = fit(tmp_path / "a", "--data.groups", "0:2", "--trainer.max_steps", "6").model
    alone = fit(tmp_path / "b", "--data.groups", "[1]", "--trainer.max_steps", "6").model
    assert torch.allclose(both.final_delta()[1], alone.final_delta()[0], atol=1e-4)
    batch = both.trainer.datamodule.batch
    with torch.no_grad():
        trained = both.losses(batch)["target"]
        both.delta_v.zero_()
        untrained = both.losses(batch)["target"]
    assert (trained < untrained - 0.05).all()


def test_stopped_group_keeps_the_delta_that_converged(tmp_path, monkeypatch):
    """Group 0 reaches the stop loss at its 3rd step (its loss is forced to 0 there), group 1 never
    does: group 0's ΔV is frozen at the value that converged while Adam goes on for group 1."""
    from lafn_lightning.editing.module import LafnEditModule

    real, seen = LafnEditModule.losses, []

    def losses(self, batch, active=None, cells=None):
        out = real(self, batch, active, cells)
        if int(self.steps[0]) == 2:                     # group 0's 3rd step: converged here
            seen.append(self.delta_v.detach()[0].clone())
            out["target"] = torch.stack([out["target"][0] * 0, out["target"][1]])
        return out

    monkeypatch.setattr(LafnEditModule, "losses", losses)
    module = fit(tmp_path, "--trainer.max_steps", "6", "--data.groups", "0:2").model
    assert module.stopped.tolist() == [True, False] and module.steps.tolist() == [3, 6]
    assert seen[0].abs().sum() > 0                                   # trained for two steps
    assert torch.equal(module.final_delta()[0], seen[0] * module.mask[0])   # what converged is exported
    assert torch.equal(module.delta_v.detach()[0], seen[0])          # Adam's momentum did not move it after
    assert not torch.equal(module.delta_v.detach()[1] * module.mask[1], torch.zeros_like(seen[0]))


def test_export_writes_a_cache_each_fit_adds_to(tmp_path):
    fit(tmp_path, "--data.groups", "0:2", "--trainer.max_steps", "2")
    fit(tmp_path, "--data.groups", "2:3", "--trainer.max_steps", "2")
    cache = EditCache.open(tmp_path / "cache")
    assert sorted(cache.group_ids) == ["mzsre:0", "mzsre:1", "mzsre:2"]
    entry = cache.entry("mzsre:2")
    assert entry.meta["steps"] == 2 and entry.subjects["en"] and entry.subjects["zh"]
    assert cache.verify() == []


def test_interrupted_fit_leaves_cache_as_before(tmp_path, monkeypatch):
    fit(tmp_path, "--data.groups", "0:1", "--trainer.max_steps", "2")
    manifest = (tmp_path / "cache" / "manifest.json").read_bytes()
    from lafn_lightning.editing.module import LafnEditModule

    original = LafnEditModule.training_step

    def crash(self, batch, idx):
        if self.global_step == 1:
            raise RuntimeError("simulated crash mid-batch")
        return original(self, batch, idx)

    monkeypatch.setattr(LafnEditModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, "--data.groups", "1:3", "--trainer.max_steps", "2")
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == manifest
    assert EditCache.open(tmp_path / "cache").group_ids == ["mzsre:0"]


def test_resume_from_checkpoint_equals_an_uninterrupted_fit(tmp_path):
    straight = fit(tmp_path / "straight", "--trainer.max_steps", "4").model
    first = fit(tmp_path / "first", "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "true")
    ckpt = first.trainer.checkpoint_callback.best_model_path
    resumed = fit(tmp_path / "resumed", "--trainer.max_steps", "4", "--ckpt_path", ckpt).model
    assert int(resumed.steps.max()) == 4
    assert torch.equal(resumed.mask, straight.mask)
    assert torch.allclose(resumed.final_delta(), straight.final_delta(), atol=1e-6)
