"""The chunked LM-head cross-entropy gives the full-logit loss and gradient, and the edit module uses it."""
import pytest
import torch
import torch.nn.functional as F

from conftest import fit
from lafn_lightning.editing.chunked_loss import chunked_token_nll

V = 262_144  # the demo backbone's vocabulary size


def _reference(h, w, gold, softcap=None):
    z = (h.to(w.dtype) @ w.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, gold, reduction="none")


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_equals_full_cross_entropy_and_its_gradient(softcap, dtype):
    gen = torch.Generator().manual_seed(0)
    n, d, vocab = 37, 32, V if dtype == torch.float32 else V // 8   # CPU bf16 matmuls are slow here
    w = (torch.randn(vocab, d, generator=gen) * 0.5).to(dtype)
    gold = torch.randint(0, vocab, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen)                      # a weighted sum, not only the mean
    h1 = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
    h2 = h1.detach().clone().requires_grad_()
    full = _reference(h1, w, gold, softcap)
    (full * upstream).sum().backward()
    chunked = chunked_token_nll(h2, w, gold, softcap=softcap, chunk_rows=8)   # 5 chunks, the last short
    (chunked * upstream).sum().backward()
    assert full.min() > 0.5                                      # a loss far from zero
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    assert h2.grad.dtype == dtype and h2.grad.abs().sum() > 0


def test_chunked_nll_refuses_a_trainable_head():
    w = torch.randn(50, 8, requires_grad=True)
    with pytest.raises(ValueError, match="LM head"):
        chunked_token_nll(torch.randn(3, 8), w, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_edit_module_chunked_loss_equals_full_logits_loss(tmp_path, family):
    cli = fit(tmp_path, "--model.backbone", f"tiny-{family}", "--data.groups", "0:3", "--trainer.fast_dev_run", "true")
    module, batch = cli.model, cli.datamodule.batch
    with torch.no_grad():
        module.delta_v.copy_(torch.randn_like(module.delta_v))
    results = []
    for chunked in (False, True):
        module.hparams.chunked_loss = chunked
        module.delta_v.grad = None
        out = module.losses(batch)
        (out["target"].sum() + out["kl"].sum()).backward()
        results.append((out["target"].detach(), out["row_logprob"].detach(), module.delta_v.grad.clone()))
    assert results[0][2].abs().sum() > 0
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
