"""``lafn plan``: a run sized from the backbone's config alone, before any compute."""
import json

import pytest

from lafn_lightning.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if a backbone's weights are loaded: the plan reads configs only."""
    import lafn_lightning.backbone.loading as loading

    monkeypatch.setattr(loading, "_load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    loading._cached.cache_clear()
    yield
    loading._cached.cache_clear()


def _plan(tmp_path, capsys, *args):
    out = tmp_path / "plan.json"
    main(["plan", "-c", "tiny", "--peak_tflops", "1", "--output", str(out), *args])
    return json.loads(out.read_text()), capsys.readouterr().out


def test_plan_prints_memory_flops_steps_and_hours_without_weights(tmp_path, capsys, no_weights):
    plan, text = _plan(tmp_path, capsys, "--data.groups", "0:8", "--edit_batch_size", "4", "--steps_per_group", "10")
    assert "memory per device" in text and "GFLOP per group step" in text and "h for the run" in text
    assert plan["groups"] == 8 and plan["rows_per_device"] == 4 * 2 * 2   # 4 groups x en,zh x 2 prefixes
    assert plan["peak_memory_gb"] > 0 and plan["gflop_per_group_step"] > 0
    compute_bound = plan["gflop_per_group_step"] * 1e9 / (1e12 * plan["mfu"])
    assert plan["seconds_per_group_step"] >= compute_bound                   # FLOPs at peak x MFU, plus per-forward cost
    assert plan["hours"] == pytest.approx(8 * 10 * plan["seconds_per_group_step"] / 3600, rel=1e-6)


def test_more_devices_shard_the_edit_batch_and_divide_the_hours(tmp_path, capsys, no_weights):
    slow = ["--peak_tflops", "1e-6"]   # compute-bound: the per-forward cost does not matter
    one, _ = _plan(tmp_path, capsys, "--data.groups", "0:8", "--edit_batch_size", "8", "--steps_per_group", "10", *slow)
    two, _ = _plan(tmp_path, capsys, "--data.groups", "0:8", "--edit_batch_size", "8", "--steps_per_group", "10",
                   "--trainer.devices", "2", *slow)
    assert two["rows_per_device"] == one["rows_per_device"] // 2
    assert 0.3 * one["hours"] < two["hours"] <= 0.55 * one["hours"]   # half the groups each (padded per device)


def test_a_small_budget_makes_the_plan_checkpoint_and_predict_less_memory(tmp_path, capsys, no_weights):
    full, _ = _plan(tmp_path, capsys, "--data.groups", "0:8", "--data.languages", "null", "--model.max_rows", "null")
    small, _ = _plan(tmp_path, capsys, "--data.groups", "0:8", "--data.languages", "null",
                     "--device_gb", str(full["peak_memory_gb"] - 0.3 * full["memory_parts_gb"]["activations"]))
    assert full["max_rows"] is None and small["max_rows"] is not None and small["max_rows"] < full["rows_per_device"]
    assert small["peak_memory_gb"] < full["peak_memory_gb"] and small["fits"]
    # checkpointing recomputes the answer rows' forward: more FLOPs per step
    assert small["gflop_per_group_step"] > full["gflop_per_group_step"]


def test_steps_prior_from_a_cache(tmp_path, capsys):
    from conftest import fit

    fit(tmp_path, "--trainer.max_steps", "3", "--model.stop_loss", "0", "--data.groups", "0:2")
    plan, text = _plan(tmp_path, capsys, "--prior_cache", str(tmp_path / "cache"))
    assert plan["steps_per_group"] == 3 and "prior cache" in text


def test_paper_architectures_plan_from_their_configs(tmp_path, capsys, no_weights):
    for name, layers in (("llama3.1-8b", "[11,12,13,31]"), ("qwen2-7b", "[19,20,21,27]"), ("bloomz-7b1-mt", "[9,10,11,29]")):
        plan, _ = _plan(tmp_path, capsys, "--model.backbone", f"random-{name}", "--model.layers", layers,
                        "--model.dtype", "bfloat16", "--data.groups", "0:2", "--device_gb", "80")
        assert plan["memory_parts_gb"]["weights"] > 10          # 7-8B parameters in bf16
