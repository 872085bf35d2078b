"""One small hook helper (in the spirit of MEMIT's ``nethook``).

    with Hooks() as hooks:
        hooks.on_output(model.model.layers[3].mlp.act_fn, lambda out: out * 2)
        logits = model(**batch).logits            # hooks removed on exit, even on error

Every forward hook of the project goes through :class:`Hooks`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn


class Hooks(AbstractContextManager):
    """Register forward hooks for the duration of a ``with`` block.

    ``on_output(module, fn)``: ``fn(output) -> new output or None`` (None keeps the output).
    ``on_input(module, fn)``: ``fn(first input) -> new input or None`` (the first positional
    argument, else ``hidden_states=`` or the first keyword argument).
    ``on_call(module, fn)``: ``fn(args, kwargs)`` before each call (observes only).
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def on_output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> "Hooks":
        def hook(_mod, _args, output):
            return fn(output)

        self._handles.append(module.register_forward_hook(hook))
        return self

    def on_input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> "Hooks":
        def hook(_mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))  # called by keyword
            new = fn(kwargs[name])
            return None if new is None else (args, {**kwargs, name: new})

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def on_call(self, module: nn.Module, fn: Callable[[tuple, dict], None]) -> "Hooks":
        """``fn(args, kwargs)`` before every call of ``module`` (observes; changes nothing)."""
        def hook(_mod, args, kwargs):
            fn(args, kwargs)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def stop_after(self, module: nn.Module) -> "Hooks":
        """End the forward once ``module`` has run (after the hooks registered on it before this
        one): :class:`StopForward`, which :func:`forward_until_stop` catches. The layers above never run."""
        def stop(_output):
            raise StopForward
        return self.on_output(module, stop)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


class StopForward(Exception):
    """Raised by a hook to end a forward early (:meth:`Hooks.stop_after`, :func:`forward_until_stop`)."""


def forward_until_stop(model: nn.Module, **inputs):
    """``model(**inputs)``, or None where a hook raised :class:`StopForward` on the way.

        with Hooks() as hooks:
            hooks.on_output(act_fn_of_layer_5, record)
            hooks.stop_after(act_fn_of_layer_5)       # layers 6.. and the LM head never run
            forward_until_stop(model, input_ids=ids)
    """
    try:
        return model(**inputs)
    except StopForward:
        return None


def add_at_positions(x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with ``values[i]`` added at ``x[rows[i], positions[i]]`` (out of place, differentiable).

    ``x``: [batch, seq, d]; ``rows``, ``positions``: [n]; ``values``: [n, d]. Positions beyond the
    current sequence length (a decoding step after the prompt) are ignored.
    """
    keep = positions < x.shape[1]
    if not bool(keep.all()):
        rows, positions, values = rows[keep], positions[keep], values[keep]
    if rows.numel() == 0:
        return x
    return x.index_put((rows, positions), values.to(x.dtype), accumulate=True)
