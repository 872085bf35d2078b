"""Fast paths of the edit loop: cached lower layers (same loss and gradient as the full forward,
lower layers not run) and a contiguous LM-head input."""
import pytest
import torch

from conftest import fit
from lafn_lightning.backbone.hooks import Hooks


def _loss_and_grad(module, batch):
    module.delta_v.grad = None
    out = module.losses(batch)
    total = out["target"].sum() + out["kl"].sum()
    total.backward()
    return out["target"].detach(), out["kl"].detach(), module.delta_v.grad.clone()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bloom", "gpt2"])
def test_cached_lower_layers_give_the_full_forward_loss(tmp_path, family):
    cli = fit(tmp_path, "--model.backbone", f"tiny-{family}", "--model.layers", "[2, 3]",
              "--trainer.fast_dev_run", "true")
    module, batch = cli.model, cli.datamodule.batch
    assert set(module._lower_states) == {"", "kl_"}              # captured at fit start
    with torch.no_grad():                                        # a ΔV large enough to matter
        module.delta_v.copy_(torch.randn_like(module.delta_v))
    stack = module.backbone.get_submodule(module.adapter.layers_path)
    calls = []
    with Hooks() as hooks:
        for i in range(2):
            hooks.on_output(stack[i], lambda out, i=i: calls.append(i))
        cached = _loss_and_grad(module, batch)
    assert calls == []                                           # layers 0-1 never ran
    assert all(type(stack[i]).__name__ != "_PassThrough" for i in range(len(stack)))  # restored
    states = module._lower_states
    module._lower_states = {}                                    # full forward
    full = _loss_and_grad(module, batch)
    module._lower_states = states
    assert cached[1].abs().sum() > 0 and full[2].abs().sum() > 0
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cached_states_are_not_used_for_another_batch(tmp_path):
    cli = fit(tmp_path, "--model.layers", "[2, 3]", "--trainer.fast_dev_run", "true")
    module, batch = cli.model, dict(cli.datamodule.batch)
    batch["input_ids"] = batch["input_ids"].flip(0)              # a different batch of the same shape
    rows = torch.arange(batch["input_ids"].shape[0])
    assert module._cached_lower("", batch["input_ids"], rows) is None
    assert module._cached_lower("", cli.datamodule.batch["input_ids"], rows) is not None


def test_switch_off_and_first_layer_zero_run_the_full_model(tmp_path):
    off = fit(tmp_path / "a", "--model.cache_lower_layers", "false", "--trainer.fast_dev_run", "true").model
    zero = fit(tmp_path / "b", "--model.layers", "[0, 2]", "--trainer.fast_dev_run", "true").model
    assert off.lower is None and off._lower_states == {}
    assert zero.lower is None and zero._lower_states == {}


def test_lm_head_gets_a_contiguous_input_with_logits_to_keep():
    from lafn_lightning.backbone.loading import load_backbone

    model, _ = load_backbone("tiny-gemma3")
    seen = []
    with Hooks() as hooks:
        # registered after the backbone's own hook, so this sees what the head computes with
        hooks.on_input(model.get_output_embeddings(), lambda x: seen.append(x.is_contiguous()))
        model(input_ids=torch.randint(5, 100, (3, 9)), logits_to_keep=4)
    assert seen == [True]


def test_answer_positions_only_give_the_full_logits_loss(tmp_path):
    cli = fit(tmp_path, "--model.backbone", "tiny-qwen2", "--data.groups", "0:3", "--trainer.fast_dev_run", "true")
    module, b = cli.model, cli.datamodule.batch
    with torch.no_grad():
        module.delta_v.copy_(torch.randn_like(module.delta_v))
        fast = module.losses(b)
        ids, width = b["input_ids"], b["input_ids"].shape[1]
        logits = module._forward(ids, b["attention_mask"], b["group"], b["subject_pos"], width)  # every position
        assert logits.shape[:2] == ids.shape
        logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = b["target_mask"][:, :-1]
        row_nll = -(logp * m).sum(1) / m.sum(1)
        ref = torch.stack([row_nll[b["group"] == g].mean() for g in range(3)])
    torch.testing.assert_close(fast["target"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["row_logprob"], (logp * m).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "bloom", "gpt2"])
def test_prefix_cache_gives_the_full_forward_loss_from_fewer_positions(tmp_path, family):
    cli = fit(tmp_path, "--model.backbone", f"tiny-{family}", "--model.layers", "[2, 3]", "--data.groups", "0:3",
              "--model.length_buckets", "2", "--trainer.fast_dev_run", "true")
    module, batch = cli.model, cli.datamodule.batch
    with torch.no_grad():                                        # a ΔV large enough to matter
        module.delta_v.copy_(torch.randn_like(module.delta_v))
    stack = module.backbone.get_submodule(module.adapter.layers_path)
    lengths = []
    with Hooks() as hooks:
        hooks.on_input(stack[3], lambda x: lengths.append(x.shape[1]))
        cached = _loss_and_grad(module, batch)
    answer_lengths = lengths[:-1]                                # the last forward is the KL rows'
    kv = module._prefix_kv
    module._prefix_kv = {}                                       # every position of every row
    lengths.clear()
    with Hooks() as hooks:
        hooks.on_input(stack[3], lambda x: lengths.append(x.shape[1]))
        full = _loss_and_grad(module, batch)
    module._prefix_kv = kv
    assert set(kv) == {""}
    assert sum(answer_lengths) < sum(lengths[:-1])                # the prefix positions did not run
    assert cached[0].abs().sum() > 0 and full[2].abs().sum() > 0
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
