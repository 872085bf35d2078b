"""A low-rank update of the down-projections (or attention output projections), applied by
forward hooks (weights never change).

Usage::

    update = LowRankUpdate()
    update.add(layer=6, left=u[None], right=v[None])   # delta W = right^T @ left: [d_model, d_ff]
    with update.applied(model):                         # down_proj(x) + (x @ left^T) @ right
        logits = model(ids).logits
    update.delta(6)                                     # the dense [d_model, d_ff] matrix

Factors are kept in float32; the hook computes in float32 and casts back to the output dtype.
``LowRankUpdate(skip_ids=tokenizer.all_special_ids)`` leaves the positions of those token ids
unchanged (read from the ``input_ids`` of the model's call; BOS, padding): the key statistics
leave special tokens out, so nothing controls what the update does there (Gemma's BOS is the
attention sink every later token reads; docs/locate_then_edit.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..backbone.ffn import adapter_for
from ..backbone.hooks import Hooks


class LowRankUpdate:
    """Per (module, layer), factors ``left`` [r, d_in] and ``right`` [r, d_out] of ``delta W = right^T @ left``.

    ``module`` is ``"down"`` (the FFN down-projection, every method's default) or ``"o_proj"``
    (the attention output projection; M-PMET with ``rewrite: [down, o_proj]``)."""

    def __init__(self, skip_ids=()) -> None:
        self.parts: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.skip_ids: tuple[int, ...] = tuple(sorted({int(i) for i in skip_ids}))

    @property
    def factors(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The down-projection factors by layer."""
        return {layer: f for (module, layer), f in self.parts.items() if module == "down"}

    @property
    def layers(self) -> list[int]:
        """Every layer with an update (of any module)."""
        return sorted({layer for _, layer in self.parts})

    def add(self, layer: int, left: torch.Tensor, right: torch.Tensor, module: str = "down") -> None:
        """Add ``right^T @ left`` (``left`` [r, d_in] or [d_in], ``right`` [r, d_out] or [d_out])."""
        left = left.detach().to("cpu", torch.float32).reshape(-1, left.shape[-1])
        right = right.detach().to("cpu", torch.float32).reshape(-1, right.shape[-1])
        if left.shape[0] != right.shape[0]:
            raise ValueError(f"rank mismatch: left {tuple(left.shape)}, right {tuple(right.shape)}")
        key = (module, int(layer))
        if key in self.parts:
            old_l, old_r = self.parts[key]
            left, right = torch.cat([old_l, left]), torch.cat([old_r, right])
        self.parts[key] = (left, right)

    def rank(self, layer: int, module: str = "down") -> int:
        return int(torch.linalg.matrix_rank(self.delta(layer, torch.float64, module)))

    def delta(self, layer: int, dtype: torch.dtype = torch.float32, module: str = "down") -> torch.Tensor:
        left, right = self.parts[(module, layer)]
        return right.to(dtype).T @ left.to(dtype)

    def hooks(self, model: nn.Module) -> Hooks:
        """Register the hooks (caller removes them with ``.remove()``)."""
        adapter = adapter_for(model)
        hooks = Hooks()
        device = next(model.parameters()).device
        keep = {}   # [batch, seq, 1] of the current call: 0 at the skipped token ids
        if self.skip_ids:
            skip = torch.tensor(self.skip_ids, device=device)

            def read_ids(args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
                keep.clear()
                if ids is not None:
                    keep["m"] = (~torch.isin(ids, skip.to(ids.device)))[..., None].float()
            hooks.on_call(model, read_ids)
        for (kind, layer), (left, right) in self.parts.items():
            l, r = left.to(device), right.to(device)
            module = adapter.linear_module(model, kind, layer)
            box = {}

            def grab(x, box=box):
                box["x"] = x

            def add(out, box=box, l=l, r=r):
                x = box.pop("x")
                d = (x.to(torch.float32) @ l.T) @ r
                if "m" in keep and keep["m"].shape[:2] == d.shape[:2]:
                    d = d * keep["m"]
                return out + d.to(out.dtype)

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
