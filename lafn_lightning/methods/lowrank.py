"""A low-rank update of the down-projections, applied by forward hooks (weights never change).

Usage::

    update = LowRankUpdate()
    update.add(layer=6, left=u[None], right=v[None])   # delta W = right^T @ left: [d_model, d_ff]
    with update.applied(model):                         # down_proj(x) + (x @ left^T) @ right
        logits = model(ids).logits
    update.delta(6)                                     # the dense [d_model, d_ff] matrix

Factors are kept in float32; the hook computes in float32 and casts back to the output dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..backbone.ffn import adapter_for
from ..backbone.hooks import Hooks


class LowRankUpdate:
    """Per layer, factors ``left`` [r, d_ff] and ``right`` [r, d_out] of ``delta W = right^T @ left``."""

    def __init__(self) -> None:
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    def add(self, layer: int, left: torch.Tensor, right: torch.Tensor) -> None:
        """Add ``right^T @ left`` (``left`` [r, d_ff] or [d_ff], ``right`` [r, d_out] or [d_out])."""
        left = left.detach().to("cpu", torch.float32).reshape(-1, left.shape[-1])
        right = right.detach().to("cpu", torch.float32).reshape(-1, right.shape[-1])
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"rank mismatch: left {tuple(left.shape)}, right {tuple(right.shape)}")
        if layer in self.factors:
            old_l, old_r = self.factors[layer]
            left, right = torch.cat([old_l, left]), torch.cat([old_r, right])
        self.factors[int(layer)] = (left, right)

    def rank(self, layer: int) -> int:
        return int(torch.linalg.matrix_rank(self.delta(layer, torch.float64)))

    def delta(self, layer: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        left, right = self.factors[layer]
        return right.to(dtype).T @ left.to(dtype)

    def hooks(self, model: nn.Module) -> Hooks:
        """Register the hooks (caller removes them with ``.remove()``)."""
        adapter = adapter_for(model)
        hooks = Hooks()
        device = next(model.parameters()).device
        for layer, (left, right) in self.factors.items():
            l, r = left.to(device), right.to(device)
            module = adapter.down_module(model, layer)
            box = {}

            def grab(x, box=box):
                box["x"] = x

            def add(out, box=box, l=l, r=r):
                x = box.pop("x")
                return out + ((x.to(torch.float32) @ l.T) @ r).to(out.dtype)

            hooks.on_input(module, grab)
            hooks.on_output(module, add)
        return hooks

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        hooks = self.hooks(model)
        try:
            yield
        finally:
            hooks.remove()
