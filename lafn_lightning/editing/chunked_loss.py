"""Token cross-entropy through the LM head, a few rows at a time (forward and backward).

    nll = chunked_token_nll(hidden, lm_head.weight, gold, softcap=model.config.final_logit_softcapping)

Only ``chunk_rows x vocab`` fp32 logits exist at any time: the backward recomputes each chunk's
logits instead of keeping them, so 16 groups x 12 languages x 4 prefixes over Gemma's 262k
vocabulary costs a few 64 MB chunk buffers instead of tokens x vocab x ~12 bytes. Same value and gradient
as ``F.cross_entropy(lm_head(hidden).float(), gold)`` (logits in the weight's dtype, loss in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Default chunk: about 16 M fp32 logits (64 MB) per chunk (64 rows of a 262k vocabulary).
CHUNK_ELEMENTS = 1 << 24


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    raw = F.linear(h.to(weight.dtype), weight, bias).float()   # as the LM head computes it (no copy of weight.T)
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return t * softcap, t


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, gold, chunk, softcap):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            z, _ = _logits(hidden[s:s + chunk], weight, bias, softcap)
            g = gold[s:s + chunk]
            nll[s:s + chunk] = torch.logsumexp(z, -1) - z.gather(1, g[:, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, gold)
        ctx.chunk, ctx.softcap = chunk, softcap
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, gold = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        if grad_h is not None:
            for s in range(0, hidden.shape[0], ctx.chunk):
                z, t = _logits(hidden[s:s + ctx.chunk], weight, bias, ctx.softcap)
                p = torch.softmax(z, -1)                       # d nll / d z = softmax - onehot
                rows = torch.arange(p.shape[0], device=p.device)
                p[rows, gold[s:s + ctx.chunk]] -= 1
                p *= grad_nll[s:s + ctx.chunk, None]
                if t is not None:                              # d (cap tanh(x / cap)) / dx = 1 - tanh^2
                    p *= 1 - t * t
                grad_h[s:s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad_h, None, None, None, None, None


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor, *,
                      bias: torch.Tensor | None = None, softcap: float | None = None,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row negative log-likelihood of ``gold`` under ``softcap(hidden @ weight.T + bias)``.

    ``chunked_token_nll(h [n, d], lm_head.weight [V, d], gold [n]) -> nll [n]`` (fp32).
    Differentiable in ``hidden`` only (the LM head is frozen). ``chunk_rows``: rows per chunk
    (default: about 32 M logits per chunk).
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("chunked_token_nll does not train the LM head (its weight requires grad)")
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedNLL.apply(hidden, weight.detach(), None if bias is None else bias.detach(), gold, int(chunk), softcap)


def head_softcap(model) -> float | None:
    """The model's final-logit soft-capping (Gemma 2/3 ``final_logit_softcapping``), or None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None
