"""What ``lafn evaluate --method`` needs from a comparison method; each method is a module of its own.

    method = from_config(yaml.safe_load(open("configs/methods/rome-demo.yaml"))["method"])
    with method.edited(model, tokenizer, [group], "edit_cache/rome") as target:
        cells = score_group(model, tokenizer, group, {"edit_one_test_one": target})

``edited`` edits (or reuses the stored result from ``workdir``: artifacts are fingerprinted and
resumable; weights on disk never change) and yields what score_group calls: a module with the
backbone's ``forward``/``generate``, edited only through its own calls, so the backbone stays the
unedited reference of Locality. A method that edits the context instead of the weights (ReMaKE)
yields an :class:`InContext`, whose ``rewrite_prompts`` score_group applies before running it.
An optional ``prepare(model, tokenizer, groups, workdir)`` runs once before the first group.
"""
from __future__ import annotations

import re
import sys
import warnings
from typing import Callable, ContextManager, Protocol, Sequence

from torch import nn

from ..data import EditGroup

__all__ = ["EditMethod", "InContext", "artifact_stem", "deprecated_names"]


class EditMethod(Protocol):
    name: str

    def edited(self, model: nn.Module, tokenizer, groups: Sequence[EditGroup], workdir) -> ContextManager[nn.Module]:
        ...


def deprecated_names(module: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that resolves each deprecated class name of ``names`` (a
    ``class_path`` that a method config or an evaluation progress file may give) to the class it now
    names, with a FutureWarning. Classes are named ``<Method>Method`` (their settings are their
    fields; ``ValueHParams`` holds the value optimisation's)."""
    def __getattr__(name: str):
        if name in names:
            warnings.warn(f"{module}.{name} is deprecated: use {module}.{names[name]}", FutureWarning, stacklevel=2)
            return getattr(sys.modules[module], names[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__


def artifact_stem(groups: Sequence[EditGroup]) -> str:
    """A file name for the artifact of an edit batch (``mzsre:0`` -> ``mzsre_0``)."""
    ids = "+".join(g.group_id for g in groups)
    return re.sub(r"[^A-Za-z0-9_+-]", "_", ids)[:200]


class InContext(nn.Module):
    """The unchanged backbone, scored on rewritten prompts (``rewrite_prompts(prompts) -> prompts``)."""

    def __init__(self, backbone: nn.Module, rewrite: Callable[[list[str]], list[str]]) -> None:
        super().__init__()
        self.backbone, self.rewrite_prompts = backbone, rewrite

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def forward(self, *args, **kwargs):
        return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.backbone.generate(*args, **kwargs)
