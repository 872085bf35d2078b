"""Adding ΔV to neuron values at given token positions: shared by training and inference."""
from __future__ import annotations

import torch
from torch import nn

from ..backbone.ffn import SITES, FFNAdapter
from ..backbone.hooks import Hooks, add_at_positions


def site_module(model: nn.Module, adapter: FFNAdapter, layer: int, site: str) -> tuple[nn.Module, str]:
    """The module to hook for ``site`` in ``layer`` and whether to hook its ``input`` or ``output``.

    For a gated FFN the value entering the down-projection is only visible as that module's input;
    for a plain FFN it is the activation's output (which also covers BLOOM's tensor-parallel
    path that slices the down-projection weight instead of calling it).
    """
    if site not in SITES:
        raise ValueError(f"unknown injection site {site!r}; one of {SITES}")
    if adapter.family == "gated" and site == "value":
        return adapter.down_module(model, layer), "input"
    return adapter.activation_module(model, layer), "output"


def delta_hooks(model: nn.Module, adapter: FFNAdapter, layers, site: str, rows: torch.Tensor,
                positions: torch.Tensor, values: torch.Tensor, hooks: Hooks | None = None,
                only_length: int | None = None) -> Hooks:
    """Hooks adding ``values[i, j]`` to the neuron values of ``layers[j]`` at ``(rows[i], positions[i])``.

    ``values``: [n, len(layers), d_ff]. Use as ``with delta_hooks(...): model(...)``.
    ``only_length``: apply only to calls whose sequence length is this (the prefill of ``generate``,
    so decoding steps with a KV cache never receive ΔV again).
    """
    hooks = hooks if hooks is not None else Hooks()
    for j, layer in enumerate(layers):
        module, where = site_module(model, adapter, layer, site)
        def fn(x, _v=values[:, j]):
            if only_length is not None and x.shape[1] != only_length:
                return None
            return add_at_positions(x, rows, positions, _v)

        (hooks.on_input if where == "input" else hooks.on_output)(module, fn)
    return hooks
