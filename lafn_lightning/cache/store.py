"""The edit cache on disk: per group, the located neurons' ΔV values and packed mask (safetensors
shards) plus one JSON manifest (subjects, backbone fingerprint, how the edits were made).

    from lafn_lightning.cache import EditCache, write_shard
    cache = EditCache.open("edit_cache", fingerprint=fp)     # refuses another backbone
    entry = cache.entry("mzsre:0")                             # dense ΔV [layers, d_ff]

Atomic, lock-guarded and mergeable; the format and its guarantees: docs/cache.md.

This module writes groups into a cache (:func:`write_shard`, :func:`set_skipped`) and is the
cache's import surface; the rest lives beside it: ``manifest`` (format, errors, the manifest and
its checks), ``shards`` (entries, masks, checked shard reads), ``commit`` (committing a change;
the router key file), ``edit_cache`` (:class:`EditCache`: reading, delete, verify, gc, stats),
``merge`` (:func:`merge_caches`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..backbone.fingerprint import FingerprintMismatch, canonical_fingerprint, fingerprints_differ
from ..files import atomic_write, locked
from safetensors.torch import save as _st_save
from .commit import _commit, _copy, _load_keys, _referenced, _unlink, _writing
from .edit_cache import EditCache
from .manifest import (_SHARD_NAME_RE, _VALUE_DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_DIR,
                       SHARD_SUFFIX, CacheError, ValueOverflow, _jsonable, _manifest_for, _prepare_dir,
                       _read_manifest, _utcnow, _write_manifest)
from .merge import merge_caches, same_fact
from .shards import CacheEntry, _validate_entry, pack_mask, unpack_mask

# the other names this module has always offered
from .manifest import LEGACY_SETTINGS, MIN_FREE_BYTES, READABLE_VERSIONS, check_settings  # noqa: F401
from .manifest import check_target, manifest_settings, shard_bytes  # noqa: F401

__all__ = [
    "CacheError",
    "ValueOverflow",
    "FingerprintMismatch",
    "CacheEntry",
    "EditCache",
    "write_shard",
    "merge_caches",
    "same_fact",
    "shard_bytes",
    "fingerprints_differ",
    "pack_mask",
    "unpack_mask",
    "MANIFEST_NAME",
    "SHARD_DIR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]


# --------------------------------------------------------------------------------------------
# writing


def write_shard(
    cache_dir: str | os.PathLike,
    entries: list[CacheEntry],
    fingerprint: dict,
    *,
    shard_name: str | None = None,
    value_dtype: torch.dtype = torch.float16,
    lock_timeout: float | None = 600.0,
    settings: dict | None = None,
    router_keys: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``entries`` as one new shard of the cache in ``cache_dir`` and index them.

    ``settings``: how the edits were made (site, dtype, locating, loss weights, steps, ...),
    recorded once per cache; a cache holding edits made with other settings is refused.
    ``router_keys``: called under the lock with the cache's current router keys (a KeyStore, or
    None) and returning them with the entries' keys added; written in the same commit, before the
    manifest (the groups are marked ``router_key`` there, which ``verify`` checks).

    Creates the directory if needed. Under the directory lock: re-reads the manifest, refuses a
    different backbone (:class:`FingerprintMismatch`), writes ``shards/<shard_name>.safetensors``
    atomically, then the router keys, then the updated manifest atomically (the commit). Group ids
    already in the cache are replaced (newest wins); a shard no group uses any more is removed in
    the same commit. On any failure the new shard is removed again and an OSError becomes a
    one-line :class:`CacheError` naming the file.
    ``shard_name`` defaults to a unique name; an explicit name that is still referenced by groups
    not being replaced is refused. ``value_dtype`` is fp16 (default) or bf16 (fp32 is accepted
    for exactness tests). Values must be finite and representable in ``value_dtype``.
    Returns the shard's path.
    """
    cache_dir = Path(cache_dir)
    fp = canonical_fingerprint(fingerprint)
    dtype_name = next((k for k, v in _VALUE_DTYPES.items() if v == value_dtype), None)
    if dtype_name is None:
        raise CacheError(f"value_dtype must be torch.float16 or torch.bfloat16, got {value_dtype}")
    entries = list(entries)
    if not entries:
        raise CacheError(f"write_shard into {cache_dir}: no entries given")
    ids = [e.group_id for e in entries]
    dup = sorted({g for g in ids if ids.count(g) > 1})
    if dup:
        raise CacheError(f"write_shard into {cache_dir}: duplicate group ids in one shard: {dup}")

    if shard_name is None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        shard_name = f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    if shard_name.endswith(SHARD_SUFFIX):
        shard_name = shard_name[: -len(SHARD_SUFFIX)]
    fname = shard_name + SHARD_SUFFIX
    if not _SHARD_NAME_RE.match(fname):
        raise CacheError(f"invalid shard name {shard_name!r}: use letters, digits, '.', '_' and '-'")
    rel = f"{SHARD_DIR}/{fname}"

    # Serialise outside the lock (the CPU-heavy part).
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    now = _utcnow()
    for i, e in enumerate(entries):
        vals, packed, located = _validate_entry(e, fp, value_dtype)
        kv, km = f"{i}.values", f"{i}.mask"
        tensors[kv], tensors[km] = vals, packed
        records[e.group_id] = {
            "subjects": dict(e.subjects),
            "layers": [int(x) for x in e.layers],
            "d_ff": int(e.mask.shape[1]),
            "shard": rel,
            "sha256": "",
            "keys": {"values": kv, "mask": km},
            "value_dtype": dtype_name,
            "located": [int(x) for x in located],
            "meta": _jsonable(dict(e.meta or {}), f"cache entry {e.group_id!r} meta"),
            "written_at": now,
        }
        if router_keys is not None:
            records[e.group_id]["router_key"] = True
    metadata = {
        "format": FORMAT_NAME + "-shard",
        "version": str(FORMAT_VERSION),
        "fingerprint": json.dumps(fp, sort_keys=True),
        "groups": json.dumps(ids, ensure_ascii=False),
    }
    blob = _st_save(tensors, metadata=metadata)
    sha = hashlib.sha256(blob).hexdigest()
    for r in records.values():
        r["sha256"] = sha

    with _writing(cache_dir):
        _prepare_dir(cache_dir)
    with locked(cache_dir, timeout=lock_timeout):
        manifest = _manifest_for(cache_dir, fp, _jsonable(settings, "settings") if settings is not None else None)
        before = _copy(manifest)
        still_using = sorted(g for g, r in manifest["groups"].items() if r["shard"] == rel and g not in records)
        if still_using:
            raise CacheError(
                f"shard {cache_dir / rel} already exists and still holds groups {still_using[:5]}"
                f"{'...' if len(still_using) > 5 else ''}; choose another shard_name"
            )
        keys = router_keys(_load_keys(cache_dir, fp)) if router_keys is not None else None  # before any write
        shard_path = cache_dir / rel
        groups = manifest["groups"]
        for gid, rec in records.items():
            groups.pop(gid, None)  # newest wins, and moves to the end
            groups[gid] = rec
        for gid in records:
            manifest.get("skipped", {}).pop(gid, None)
        try:
            with _writing(shard_path):
                atomic_write(shard_path, blob)  # 1. the shard
            _commit(cache_dir, manifest, before, keys=keys)  # 2. router keys, 3. the manifest (commit point)
        except BaseException:
            if rel not in _referenced(before):
                _unlink([shard_path])
            raise
    return shard_path


def set_skipped(cache_dir: str | os.PathLike, skipped: Mapping[str, str], *, done: Iterable[str] = (),
                lock_timeout: float | None = 600.0) -> None:
    """Record the records a whole-dataset run skipped (``{group_id: reason}``) in the manifest's
    ``skipped`` field, and forget those in ``done`` (edited since). Needs an existing manifest.

        set_skipped("edit_cache", {"mzsre:17": "zh.subject '钫' occurs in 1.4% of ordinary zh questions"})
    """
    cache_dir = Path(cache_dir)
    with locked(cache_dir, timeout=lock_timeout):
        manifest = _read_manifest(cache_dir, missing_ok=False)
        merged = {**manifest.get("skipped", {}), **{str(k): str(v) for k, v in skipped.items()}}
        for gid in [*done, *manifest["groups"]]:
            merged.pop(gid, None)
        if merged == manifest.get("skipped", {}):
            return
        manifest["skipped"] = merged
        _write_manifest(cache_dir, manifest)
