"""Keeping trained ΔV that could not go into the edit cache (a full disk, a read-only mount, values
fp16 cannot hold), so that no training is lost: one safetensors file, added to a cache later.

    path = save_unexported(entries, fp, settings, ["runs", "."])   # after write_shard failed
    import_unexported(path, "edit_cache", value_dtype="bfloat16")   # once the cause is fixed

The file holds, per entry, the located neurons' values in float32 (``<i>.values``) and the packed
mask (``<i>.mask``), as a shard does, plus JSON metadata: the entries' ids, subjects, layers and
meta, the backbone fingerprint and the edit settings. Router keys are not kept (they need the
backbone); ``lafn_lightning.routing.build.update_cache_keys`` rebuilds them.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..files import atomic_write
from .store import CacheEntry, CacheError, ValueOverflow, _jsonable, pack_mask, unpack_mask, write_shard

__all__ = ["save_unexported", "load_unexported", "import_unexported", "UNEXPORTED_FORMAT"]

UNEXPORTED_FORMAT = "lafn-unexported-edits"


def save_unexported(entries: list[CacheEntry], fingerprint: dict, settings: dict | None,
                    places: Iterable[str | os.PathLike]) -> Path:
    """Write ``entries`` to ``lafn-unexported-<time>.safetensors`` in the first of ``places`` (then
    the system's temporary directory) that takes it; returns its path.

        save_unexported(entries, fp, record, [trainer.default_root_dir, "."])
    """
    tensors, items = {}, []
    for i, e in enumerate(entries):
        mask = e.mask.detach().cpu().bool()
        tensors[f"{i}.values"] = e.delta.detach().cpu().float()[mask].contiguous()
        tensors[f"{i}.mask"] = pack_mask(mask)
        items.append({"group_id": e.group_id, "subjects": dict(e.subjects), "layers": [int(x) for x in e.layers],
                      "d_ff": int(mask.shape[1]), "meta": _jsonable(dict(e.meta or {}), f"{e.group_id} meta")})
    blob = st_save(tensors, metadata={"format": UNEXPORTED_FORMAT, "entries": json.dumps(items, ensure_ascii=False),
                                      "fingerprint": json.dumps(_jsonable(fingerprint, "fingerprint")),
                                      "settings": json.dumps(_jsonable(settings, "settings"))})
    name = f"lafn-unexported-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}.safetensors"
    tried = []
    for place in [*places, tempfile.gettempdir()]:
        path = Path(place) / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, blob)
            return path
        except OSError as e:
            tried.append(f"{place} ({e.strerror or e})")
    raise CacheError(f"the trained ΔV could not be kept anywhere: tried {', '.join(tried)}")


def load_unexported(path: str | os.PathLike) -> tuple[list[CacheEntry], dict, dict | None]:
    """``(entries, fingerprint, settings)`` of a file :func:`save_unexported` wrote."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != UNEXPORTED_FORMAT:
                raise CacheError(f"{path}: not a file of unexported edits (format {meta.get('format')!r})")
            entries = []
            for i, item in enumerate(json.loads(meta["entries"])):
                mask = unpack_mask(f.get_tensor(f"{i}.mask"), item["d_ff"])
                delta = torch.zeros(mask.shape)
                delta[mask] = f.get_tensor(f"{i}.values")
                entries.append(CacheEntry(item["group_id"], item["subjects"], tuple(item["layers"]), mask, delta,
                                          item["meta"]))
            return entries, json.loads(meta["fingerprint"]), json.loads(meta["settings"])
    except CacheError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/JSON errors: a damaged file
        raise CacheError(f"{path}: unreadable file of unexported edits ({e})") from None


def import_unexported(path: str | os.PathLike, cache_dir: str | os.PathLike, value_dtype: str = "float16") -> list[str]:
    """Add the edits of ``path`` to the cache in ``cache_dir`` (same backbone and settings, as for
    any write); returns their group ids.

        import_unexported("runs/lafn-unexported-20250101T000000-abc123.safetensors", "edit_cache", "bfloat16")
    """
    if value_dtype not in ("float16", "bfloat16"):
        raise CacheError(f"value_dtype={value_dtype!r}: float16 or bfloat16")
    entries, fp, settings = load_unexported(path)
    try:
        write_shard(cache_dir, entries, fp, value_dtype=getattr(torch, value_dtype), settings=settings)
    except ValueOverflow as e:
        raise CacheError(f"{path}: group {e.group_id!r}: ΔV overflows {value_dtype} (max |value| {e.max_abs:.4g}); "
                         "import it with --value_dtype bfloat16") from None
    return [e.group_id for e in entries]
