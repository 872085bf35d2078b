"""Build a method from its config block (``class_path`` / ``init_args``, as LightningCLI writes them).

Usage::

    method = from_config(yaml.safe_load(open("configs/methods/memit-demo.yaml"))["method"])
    update = method.edit(model, tokenizer, requests_by_language(groups))
"""
from __future__ import annotations

import importlib

from .compute_z import ValueHParams


def from_config(spec: dict):
    """Instantiate ``spec["class_path"]`` with ``spec["init_args"]`` (a nested ``value`` dict becomes
    :class:`ValueHParams`)."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = dict(spec.get("init_args") or {})
    if isinstance(args.get("value"), dict):
        args["value"] = ValueHParams(**args["value"])
    return cls(**args)
