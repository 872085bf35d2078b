"""Run the layers below the first edited layer once, then only the upper layers at every step.

ΔV enters at the first edited layer, so the hidden states entering that layer do not depend
on ΔV: :func:`capture` computes them once per prompt and :func:`skipping` makes later forward
passes replace the lower layers with pass-throughs and start from the captured states. The
embedding lookup and the model-level masks/rotary tables still run (cheap); nothing else below
the first edited layer does. Memory: rows x sequence x d_model in the backbone dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..backbone.ffn import FFNAdapter
from ..backbone.hooks import Hooks


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: hands its input on in the layer's return type."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class LowerLayers:
    """Hidden states entering layer ``first`` of ``model``, captured once and replayed."""

    def __init__(self, model: nn.Module, adapter: FFNAdapter, first: int) -> None:
        if not 0 < first < adapter.n_layers:
            raise ValueError(f"no lower layers to cache below layer {first}")
        self.model, self.adapter, self.first = model, adapter, first
        self._as_tuple: bool | None = None

    def capture(self, run: Callable[[], object]) -> tuple[torch.Tensor, object]:
        """Call ``run()`` (a full forward); return the hidden states entering layer ``first`` and
        what ``run()`` returned."""
        seen: dict[str, torch.Tensor] = {}

        def grab(x):
            seen["h"] = x.detach()

        def kind(out):
            self._as_tuple = isinstance(out, tuple)

        with torch.no_grad(), Hooks() as hooks:
            hooks.on_input(self.adapter.layer_module(self.model, self.first), grab)
            hooks.on_output(self.adapter.layer_module(self.model, self.first - 1), kind)
            out = run()
        return seen["h"], out

    @contextmanager
    def skipping(self, hidden: torch.Tensor) -> Iterator[None]:
        """Inside the block, forward passes skip the lower layers and start from ``hidden``."""
        if self._as_tuple is None:
            raise RuntimeError("LowerLayers.skipping before capture")
        stack = self.model.get_submodule(self.adapter.layers_path)
        originals = [stack[i] for i in range(self.first)]
        try:
            for i in range(self.first):
                stack[i] = _PassThrough(self._as_tuple)
            with Hooks() as hooks:
                hooks.on_input(stack[self.first], lambda x: _checked(hidden, x))
                yield
        finally:
            for i, layer in enumerate(originals):
                stack[i] = layer


def _checked(hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if hidden.shape != x.shape:
        raise RuntimeError(f"cached lower-layer states {tuple(hidden.shape)} do not fit this batch {tuple(x.shape)}")
    return hidden
