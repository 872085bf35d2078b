"""The backbone fingerprint: the one way an edit artifact is tied to the backbone it was made on.

    fp = fingerprint(model, layers=[5, 6, 7, 17])     # name, sizes, dtype, hash of those layers
    check_fingerprint(cache_fp, fp, where="edit_cache")  # FingerprintMismatch naming each key

Memoised per model and layers while the layers' tensors are unchanged (an in-place update
bumps their version counters and is noticed).
"""
from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch
from torch import nn

from .ffn import adapter_for

__all__ = ["FingerprintMismatch", "fingerprint", "canonical_fingerprint", "fingerprints_differ", "check_fingerprint"]


class FingerprintMismatch(ValueError):
    """An artifact was made on another backbone. ``differences`` maps each differing key to
    ``(stored, given)`` (``None`` where a key is absent)."""

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.differences = dict(differences or {})

    @property
    def fields(self) -> list[str]:
        return list(self.differences)


#: model -> {edited layers: (tensor signature, fingerprint)}
_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module, adapter, layers) -> tuple:
    first = next(model.parameters())
    sig: list = [str(getattr(model.config, "name_or_path", "")), type(model).__name__, first.dtype]
    for layer in layers:
        module = adapter.layer_module(model, layer)
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            sig.append((layer, name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)))
    return tuple(sig)


def _compute(model: nn.Module, adapter, layers: tuple[int, ...]) -> dict:
    digest = hashlib.blake2b(digest_size=16)
    for layer in layers:
        for name, tensor in sorted(adapter.layer_module(model, layer).state_dict().items()):
            digest.update(f"{layer}.{name}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "name": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        "architecture": type(model).__name__,
        "n_layers": adapter.n_layers,
        "d_ff": adapter.d_ff,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "edited_layers": list(layers),
        "layers_hash": digest.hexdigest(),
    }


def fingerprint(model: nn.Module, layers) -> dict:
    """Identify a backbone for an edit artifact: name, architecture, layer count, d_ff, dtype, the
    edited layers and a hash of their weights."""
    adapter = adapter_for(model)
    key = tuple(sorted(int(i) for i in layers))
    sig = _signature(model, adapter, key)
    memo = _MEMO.setdefault(model, {})
    hit = memo.get(key)
    if hit is None or hit[0] != sig:
        hit = memo[key] = (sig, _compute(model, adapter, key))
    return json.loads(json.dumps(hit[1]))


def canonical_fingerprint(fp: dict, where: str = "fingerprint") -> dict:
    """``fp`` as plain JSON types (tuples become lists); ValueError if it is not JSON-able."""
    if not isinstance(fp, dict):
        raise ValueError(f"{where} must be a dict, got {type(fp).__name__}")
    try:
        return json.loads(json.dumps(fp, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} must be a plain JSON-able dict (strings, numbers, lists): {e}") from None


def fingerprints_differ(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ -> (stored, given); ``{}`` when equal. A key missing on one side
    counts as different (``None`` on that side)."""
    a, b = canonical_fingerprint(stored), canonical_fingerprint(given)
    keys = list(a) + [k for k in b if k not in a]
    return {k: (a.get(k), b.get(k)) for k in keys if k not in a or k not in b or a[k] != b[k]}


def _short(v: Any, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_fingerprint(stored: dict, given: dict, where: str) -> None:
    """Raise :class:`FingerprintMismatch` (one line naming every differing key) unless equal."""
    diff = fingerprints_differ(stored, given)
    if diff:
        parts = "; ".join(f"{k}: stored {_short(s)}, given {_short(g)}" for k, (s, g) in diff.items())
        raise FingerprintMismatch(
            f"{where} was made on a different backbone ({parts}); use a separate directory for each backbone", diff)
