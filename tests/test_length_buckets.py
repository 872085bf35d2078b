"""Length buckets: rows of 12 scripts run in forwards of similar length, with the loss of one padded forward."""
import torch

from conftest import fit
from lafn_lightning.backbone.hooks import Hooks


def _twelve_language_batch(tmp_path, dev_data):
    """The edit module and batch of 2 groups in 12 languages, with a random ΔV (every position run:
    the prefix cache, tested in test_fast_paths.py, would change the counts below)."""
    cli = fit(tmp_path, "--data.languages", "null", "--data.groups", "0:2", "--data.dataset", str(dev_data),
              "--model.prefix_cache", "false", "--model.max_rows", "null", "--trainer.fast_dev_run", "true")
    with torch.no_grad():
        cli.model.delta_v.copy_(torch.randn_like(cli.model.delta_v))
    return cli.model, cli.datamodule.batch


def test_length_buckets_give_the_single_forward_loss_with_less_padding(tmp_path, dev_data):
    module, batch = _twelve_language_batch(tmp_path, dev_data)
    embed = module.backbone.get_input_embeddings()
    results, cells = [], []
    for buckets in (1, 3):
        module.hparams.length_buckets = buckets
        module.delta_v.grad = None
        seen = []
        with Hooks() as hooks:
            hooks.on_output(embed, lambda out: seen.append(out.shape[0] * out.shape[1]))
            out = module.losses(batch)
        (out["target"].sum() + out["kl"].sum()).backward()
        results.append((out["target"].detach(), out["row_logprob"].detach(), module.delta_v.grad.clone()))
        cells.append(sum(seen[:-1]))                               # answer rows (the last call is the KL anchors)
        assert len(seen) == buckets + 1
    assert results[0][2].abs().sum() > 0
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    real = int(batch["attention_mask"].sum())
    assert cells[0] == batch["input_ids"].numel() and real < cells[1] < cells[0]


def test_max_rows_checkpoints_parts_with_the_same_loss_and_gradient(tmp_path, dev_data):
    """model.max_rows: forwards of at most N rows, each checkpointed (recomputed in backward)."""
    module, batch = _twelve_language_batch(tmp_path, dev_data)
    embed = module.backbone.get_input_embeddings()
    results, forwards = [], []
    for max_rows in (None, 10):
        module.rows_per_forward = max_rows
        module.delta_v.grad = None
        seen = []
        with Hooks() as hooks:
            hooks.on_output(embed, lambda out: seen.append(out.shape[0]))
            out = module.losses(batch)
            n_forward = len(seen)
            (out["target"].sum() + out["kl"].sum()).backward()
        results.append((out["target"].detach(), out["row_logprob"].detach(), module.delta_v.grad.clone()))
        forwards.append((n_forward, len(seen), max(seen[:n_forward - 1])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    rows = batch["input_ids"].shape[0]
    parts = -(-rows // 10)
    assert forwards[0] == (2, 2, rows)                     # one answer forward + the KL anchors, no recompute
    assert forwards[1][0] == parts + 1 and forwards[1][2] <= 10
    assert forwards[1][1] == 2 * parts + 1                 # each part ran again in the backward pass


def test_max_rows_auto_checkpoints_only_beyond_the_memory_budget(tmp_path, dev_data):
    """model.max_rows auto: every row in one forward when the predicted peak fits the budget; parts that
    fit it otherwise, with the loss and gradient of the one full forward."""
    module, batch = _twelve_language_batch(tmp_path, dev_data)
    from lafn_lightning.editing.sizing import Architecture, batch_shape, step_memory

    shape = batch_shape(batch)
    arch = Architecture.of(module.backbone)
    whole = step_memory(arch, shape, min(module.layers), device="cpu").peak
    module.hparams.memory_budget_gb = 2 * whole / 1e9
    module.hparams.part_tokens = 4 * shape.run_width           # parts of at most 4 rows, though all would fit
    assert module._auto_max_rows(batch) == 4
    module.hparams.part_tokens = 10 ** 9
    assert module._auto_max_rows(batch) is None
    module.hparams.memory_budget_gb = (whole - 0.5 * step_memory(arch, shape, min(module.layers)).parts["activations"]) / 1e9
    rows = module._auto_max_rows(batch)
    assert rows is not None and 1 <= rows < shape.rows
    assert step_memory(arch, shape, min(module.layers), max_rows=rows).peak <= module.hparams.memory_budget_gb * 1e9
    results = []
    for max_rows in (None, rows):
        module.rows_per_forward = max_rows
        module.delta_v.grad = None
        out = module.losses(batch)
        (out["target"].sum() + out["kl"].sum()).backward()
        results.append((out["target"].detach(), module.delta_v.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
