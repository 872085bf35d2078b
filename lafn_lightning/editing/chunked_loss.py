"""Token cross-entropy through the LM head, a few rows at a time (forward and backward).

    nll = chunked_token_nll(hidden, lm_head.weight, gold, softcap=model.config.final_logit_softcapping)

Only ``chunk_rows x vocab`` fp32 logits exist at any time: the forward turns each chunk into its
loss and, when ``hidden`` needs a gradient, into that gradient's direction ([rows, d_model]), so
16 groups x 12 languages x 4 prefixes over Gemma's 262k vocabulary costs two 256 MB chunk
buffers instead of tokens x vocab x ~12 bytes, and no chunk is projected twice. Same value and gradient
as ``F.cross_entropy(lm_head(hidden).float(), gold)`` (logits in the weight's dtype, loss in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Default chunk: about 64 M fp32 logits (256 MB) per chunk (256 rows of a 262k vocabulary). Larger
#: chunks keep the CPU's matrix units busier: 240 answer tokens in fp32 took 2.62 s in chunks of 64
#: rows and 1.50 s in one chunk (forward and backward, one run each on the 2-core machine).
CHUNK_ELEMENTS = 1 << 26


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    raw = F.linear(h.to(weight.dtype), weight, bias).float()   # as the LM head computes it (no copy of weight.T)
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return t * softcap, t


class _ChunkedNLL(torch.autograd.Function):
    """Forward and gradient in one pass over the vocabulary.

    d nll_i / d h_i = ((softmax(z_i) - onehot(gold_i)) * dz/draw) @ W, which does not depend on the
    upstream gradient except through one scalar per row: the forward keeps that [n, d] direction
    (when ``hidden`` needs a gradient) and the backward only scales it. Each chunk's logits are
    projected once (not again in the backward), which is a third of the LM head's work per step.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, gold, chunk, softcap, with_grad):
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        direction = torch.empty(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) \
            if with_grad else None
        for s in range(0, n, chunk):
            z, t = _logits(hidden[s:s + chunk], weight, bias, softcap)
            g = gold[s:s + chunk]
            logp = torch.log_softmax(z, -1)                    # faster than logsumexp on CPU
            nll[s:s + chunk] = -logp.gather(1, g[:, None]).squeeze(1)
            del z                                              # two chunk buffers at a time, not three
            if direction is not None:
                p = logp.exp_()                                # d nll / d z = softmax - onehot
                p[torch.arange(p.shape[0], device=p.device), g] -= 1
                if t is not None:                              # d (cap tanh(x / cap)) / dx = 1 - tanh^2
                    p *= 1 - t * t
                direction[s:s + chunk] = (p.to(weight.dtype) @ weight).float()
            del logp, t
        ctx.save_for_backward(direction)
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (direction,) = ctx.saved_tensors
        grad_h = None if direction is None else (direction * grad_nll[:, None]).to(ctx.hidden_dtype)
        return grad_h, None, None, None, None, None, None


def chunked_token_nll(hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor, *,
                      bias: torch.Tensor | None = None, softcap: float | None = None,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """Per-row negative log-likelihood of ``gold`` under ``softcap(hidden @ weight.T + bias)``.

    ``chunked_token_nll(h [n, d], lm_head.weight [V, d], gold [n]) -> nll [n]`` (fp32).
    Differentiable in ``hidden`` only (the LM head is frozen). ``chunk_rows``: rows per chunk
    (default: about 64 M logits per chunk, ``CHUNK_ELEMENTS``).
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("chunked_token_nll does not train the LM head (its weight requires grad)")
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedNLL.apply(hidden, weight.detach(), None if bias is None else bias.detach(), gold, int(chunk), softcap,
                             hidden.requires_grad and torch.is_grad_enabled())


def head_softcap(model) -> float | None:
    """The model's final-logit soft-capping (Gemma 2/3 ``final_logit_softcapping``), or None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None
