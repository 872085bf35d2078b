"""The backbone's residual stream at one layer, per token: the router's keys and queries.

    states = token_states(model, tokenizer, ["Where is Paris?"], layer=4)   # [T, d] per text
    ids, offsets = encode_with_offsets(tokenizer, "Where is Paris?")

Only the layers below ``layer`` run (the forward stops there), texts are batched with right
padding (a causal model's states at real tokens do not depend on it) and the states come back
L2-normalised, float32, one tensor per text (the BOS token included, row 0).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..backbone.ffn import adapter_for
from ..backbone.hooks import StopForward, forward_until_stop

__all__ = ["encode_with_offsets", "token_states", "ids_states", "normalize"]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``(input_ids, offsets)`` of ``text`` as the model sees it (special tokens: empty spans).

    >>> ids, offs = encode_with_offsets(tok, "Where is Paris?")
    """
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


@torch.no_grad()
def ids_states(model: nn.Module, rows: Sequence[Sequence[int]], layers: int | Sequence[int], *,
               batch_size: int = 32, pad_id: int = 0) -> list[torch.Tensor]:
    """Per row: hidden states (input of decoder layer ``l``, i.e. ``hidden_states[l]``) of each
    token, L2-normalised. ``layers`` an int -> [T, d]; a list -> [len(layers), T, d].

    >>> ids_states(model, [[2, 4420, 691]], 4)[0].shape   # torch.Size([3, 640])
    """
    single = isinstance(layers, int)
    wanted = [layers] if single else list(layers)
    adapter = adapter_for(model)
    blocks = model.get_submodule(adapter.layers_path)
    top = max(wanted)
    if min(wanted) < 1 or top >= len(blocks):
        raise ValueError(f"layers must be in 1..{len(blocks) - 1}, got {wanted}")
    device = next(model.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(rows[i])] = torch.tensor(list(rows[i]))
            mask[r, :len(rows[i])] = 1
        got: dict[int, torch.Tensor] = {}

        def grab(layer):
            def hook(_m, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                got[layer] = x.detach()
                if layer == top:
                    raise StopForward
            return hook

        handles = [blocks[l].register_forward_pre_hook(grab(l), with_kwargs=True) for l in wanted]
        try:
            forward_until_stop(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        stack = torch.stack([got[l] for l in wanted])  # [L, B, T, d]
        for r, i in enumerate(idx):
            s = normalize(stack[:, r, :len(rows[i])]).cpu()
            out[i] = s[0] if single else s
    return out  # type: ignore[return-value]


def token_states(model: nn.Module, tokenizer, texts: Sequence[str], layers: int | Sequence[int],
                 **kwargs) -> list[torch.Tensor]:
    """:func:`ids_states` of ``texts`` tokenised as the model sees them (BOS included).

    >>> token_states(model, tok, ["Where is Paris?"], 4)[0].shape
    """
    rows = [encode_with_offsets(tokenizer, t)[0] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ids_states(model, rows, layers, pad_id=pad, **kwargs)
