"""The edit cache on disk: per group, the located neurons' ΔV values and packed mask (safetensors
shards) plus one JSON manifest (subjects, backbone fingerprint, how the edits were made).

    from lafn_lightning.cache import EditCache, write_shard
    cache = EditCache.open("edit_cache", fingerprint=fp)     # refuses another backbone
    entry = cache.entry("mzsre:0")                             # dense ΔV [layers, d_ff]

Atomic, lock-guarded and mergeable; the format and its guarantees: docs/cache.md.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import stat as stat_mod
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open

from ..backbone.fingerprint import FingerprintMismatch, canonical_fingerprint, check_fingerprint, fingerprints_differ
from ..files import LOCK_NAME, TMP_SUFFIX as _TMP_SUFFIX, atomic_write, check_writable, fsync_dir, locked, tmp_path
from safetensors.torch import save as _st_save

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

FORMAT_NAME = "lafn-edit-cache"
FORMAT_VERSION = 2
#: versions this code reads (version 1 has no "settings" record: today's defaults are assumed)
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"

_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# errors and the entry type


class CacheError(RuntimeError):
    """Anything wrong with an edit cache on disk; the message names the file concerned."""


class ValueOverflow(CacheError):
    """A group's ΔV holds values the storage dtype cannot (float16 ends at 65,504; bfloat16 goes
    as far as float32)."""

    def __init__(self, message: str, group_id: str, max_abs: float) -> None:
        super().__init__(message)
        self.group_id, self.max_abs = group_id, max_abs


@dataclasses.dataclass
class CacheEntry:
    """One edit group's update.

    ``mask`` is bool [len(layers), d_ff]; ``delta`` is float of the same shape and only its
    values at ``mask`` positions are stored (entries loaded from a cache are exactly zero
    elsewhere). ``meta`` must be JSON-able (small: steps, final losses, located counts, ...).
    """

    group_id: str
    subjects: dict[str, str]
    layers: tuple[int, ...]
    mask: torch.Tensor
    delta: torch.Tensor
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def n_located(self) -> int:
        return int(self.mask.sum())


# --------------------------------------------------------------------------------------------
# small helpers: bit packing, JSON, atomic files, locking


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [L, d] -> uint8 [L, ceil(d/8)], bit order and padding as ``np.packbits(axis=-1)``."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [layers, d_ff], got shape {tuple(mask.shape)}")
    n_rows, d = mask.shape
    n_bytes = (d + 7) // 8
    bits = torch.zeros(n_rows, n_bytes * 8, dtype=torch.int32)
    bits[:, :d] = mask.detach().to("cpu", torch.bool).to(torch.int32)
    packed = (bits.view(n_rows, n_bytes, 8) * _BIT_WEIGHTS).sum(-1)
    return packed.to(torch.uint8).contiguous()


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """uint8 [L, ceil(d/8)] -> bool [L, d]. Raises ValueError if a padding bit is set."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (d + 7) // 8:
        raise ValueError(
            f"packed mask must be uint8 [L, {(d + 7) // 8}], got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    bits = bits.reshape(packed.shape[0], -1).to(torch.bool)
    if bits[:, d:].any():
        raise ValueError("packed mask has padding bits set")
    return bits[:, :d].contiguous()


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(obj: Any, where: str) -> Any:
    """Convert ``obj`` to plain JSON types. Tensors / numpy scalars become numbers or lists,
    tuples become lists, paths become strings, non-finite floats become ``None`` (strict JSON)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CacheError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item(), where)
    raise CacheError(f"{where}: {type(obj).__name__} value {obj!r} is not JSON-able")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# manifest


def _new_manifest(fingerprint: dict, settings: dict | None = None) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "fingerprint": fingerprint,
            "settings": settings, "groups": {}}


#: How an edit is applied, for caches written before the settings record existed (version 1).
LEGACY_SETTINGS = {"site": "value"}


def check_settings(stored: dict | None, given: dict | None, where: str) -> None:
    """Refuse to mix edits made with different settings in one cache (one line naming each key)."""
    if stored is None or given is None:
        return
    diff = {k: (stored.get(k), given.get(k)) for k in dict.fromkeys([*stored, *given]) if stored.get(k) != given.get(k)}
    if diff:
        parts = "; ".join(f"{k}: cache has {a!r}, given {b!r}" for k, (a, b) in diff.items())
        raise CacheError(f"{where} holds edits made with other settings ({parts}); use another cache directory")


def _check_layout(cache_dir: Path) -> None:
    """Refuse a cache whose own entries are symbolic links or of the wrong kind: cache operations
    never follow a link out of the directory, so they never read, write or delete outside it."""
    for name, kind in ((MANIFEST_NAME, "file"), (LOCK_NAME, "file"), (SHARD_DIR, "dir")):
        path = cache_dir / name
        if path.is_symlink():
            raise CacheError(f"edit cache {cache_dir}: {path} is a symbolic link; refusing to follow it")
        if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
            raise CacheError(f"edit cache {cache_dir}: {path} should be a {'directory' if kind == 'dir' else 'file'}")


def _prepare_dir(cache_dir: Path) -> None:
    """Create a cache directory (and ``shards/``) to write into, refusing a file or links inside."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"cache_dir {cache_dir} exists and is not a directory")
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_layout(cache_dir)
    (cache_dir / SHARD_DIR).mkdir(exist_ok=True)


def _regular(path: Path) -> bool:
    """True for a regular file that is not a symbolic link."""
    try:
        return stat_mod.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _read_manifest(cache_dir: Path, *, missing_ok: bool) -> dict | None:
    _check_layout(cache_dir)
    path = cache_dir / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        if not cache_dir.exists():
            raise CacheError(f"no edit cache at {cache_dir}: the directory does not exist") from None
        raise CacheError(f"no edit cache at {cache_dir}: {path} is missing") from None
    except OSError as e:
        raise CacheError(f"cannot read edit-cache manifest {path}: {e}") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"edit-cache manifest {path} is corrupt (not valid JSON: {e})") from None
    _validate_manifest(m, path)
    return m


def _validate_manifest(m: Any, path: Path) -> None:
    def bad(why: str) -> CacheError:
        return CacheError(f"edit-cache manifest {path} is malformed: {why}")

    if not isinstance(m, dict):
        raise bad("top level is not an object")
    if m.get("format") != FORMAT_NAME:
        raise bad(f"format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("version") not in READABLE_VERSIONS:
        raise CacheError(
            f"edit-cache manifest {path} has format version {m.get('version')!r}; "
            f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if not isinstance(m.get("fingerprint"), dict):
        raise bad("'fingerprint' missing or not an object")
    if not isinstance(m.get("settings"), (dict, type(None))):
        raise bad("'settings' is not an object")
    groups = m.get("groups")
    if not isinstance(groups, dict):
        raise bad("'groups' missing or not an object")
    need = {"subjects": dict, "layers": list, "d_ff": int, "shard": str, "sha256": str,
            "keys": dict, "value_dtype": str, "located": list, "meta": dict}
    for gid, rec in groups.items():
        if not isinstance(rec, dict):
            raise bad(f"group {gid!r} is not an object")
        for k, t in need.items():
            if not isinstance(rec.get(k), t):
                raise bad(f"group {gid!r}: field {k!r} missing or not {t.__name__}")
        if rec["value_dtype"] not in _VALUE_DTYPES:
            raise bad(f"group {gid!r}: unknown value_dtype {rec['value_dtype']!r}")
        if len(rec["located"]) != len(rec["layers"]):
            raise bad(f"group {gid!r}: 'located' and 'layers' differ in length")
        if not {"values", "mask"} <= set(rec["keys"]):
            raise bad(f"group {gid!r}: 'keys' must name 'values' and 'mask'")
        shard = rec["shard"]
        parts = shard.split("/")
        if len(parts) != 2 or parts[0] != SHARD_DIR or not _SHARD_NAME_RE.match(parts[1]):
            raise bad(f"group {gid!r}: shard path {shard!r} is not shards/<name>{SHARD_SUFFIX}")


def _dump_manifest(manifest: dict) -> bytes:
    """Compact but greppable JSON: one line per top-level field and one line per group."""

    def dump(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    head = [f" {dump(k)}: {dump(v)}" for k, v in manifest.items() if k != "groups"]
    groups = [f"  {dump(g)}: {dump(r)}" for g, r in manifest["groups"].items()]
    body = "{\n" + "".join(h + ",\n" for h in head)
    body += ' "groups": {' + ("\n" + ",\n".join(groups) + "\n }" if groups else "}") + "\n}\n"
    return body.encode("utf-8")


def _manifest_for(cache_dir: Path, fp: dict, settings: dict | None = None) -> dict:
    """The current manifest (a new one for a new cache), refused if made on another backbone or
    with other edit settings; a version-1 manifest is upgraded. Call under the lock."""
    manifest = _read_manifest(cache_dir, missing_ok=True)
    if manifest is None:
        return _new_manifest(fp, settings)
    check_fingerprint(manifest["fingerprint"], fp, str(cache_dir))
    stored = manifest_settings(manifest)
    if stored is not None and manifest.get("settings") is None:  # version 1: only what it implies
        stored = {k: v for k, v in stored.items() if k in (settings or {})}
    check_settings(stored, settings, str(cache_dir))
    if settings is not None and manifest.get("settings") is None:
        manifest["settings"] = settings
    manifest["version"] = FORMAT_VERSION
    return manifest


#: free space asked of a cache directory before the backbone is loaded (the exact shard size is
#: checked once the backbone's d_ff is known: :func:`shard_bytes`)
MIN_FREE_BYTES = 1 << 20


def shard_bytes(n_groups: int, n_layers: int, d_ff: int, value_bytes: int = 2) -> int:
    """An upper bound of the size of a shard of ``n_groups`` groups (every neuron located), plus
    the manifest lines: what a fit's export needs free.

        shard_bytes(16, 4, 2048)    # 16 groups, 4 layers of 2,048 neurons -> 282,624
    """
    return n_groups * n_layers * (d_ff * value_bytes + (d_ff + 7) // 8) + n_groups * 1024


def check_target(cache_dir: str | os.PathLike, fingerprint: dict | None, settings: dict | None = None, *,
                 need_bytes: int = MIN_FREE_BYTES, routing=None) -> None:
    """Raise a one-line error now (before any compute) if ``cache_dir`` could not take edits made
    on this backbone with these settings: not a directory, links inside, unreadable or corrupt
    manifest, another backbone (``fingerprint=None``: not checked), other settings, router keys
    built with other key settings than ``routing`` (a
    :class:`~lafn_lightning.routing.settings.RoutingSettings`; None: not checked), a read-only
    place or less than ``need_bytes`` free. A directory that does not exist yet is fine.

        check_target("edit_cache", fp, record, need_bytes=shard_bytes(16, 4, 2048), routing=routing)
    """
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"cache_dir {cache_dir} exists and is not a directory")
    check_writable(cache_dir, kind="dir", need_bytes=need_bytes, what="cache_dir")
    if (cache_dir / SHARD_DIR).is_dir() and not (cache_dir / SHARD_DIR).is_symlink():
        check_writable(cache_dir / SHARD_DIR, kind="dir", what="cache_dir")
    if cache_dir.is_dir():
        manifest = _read_manifest(cache_dir, missing_ok=True)
        if manifest is not None:
            if fingerprint is not None:
                check_fingerprint(manifest["fingerprint"], canonical_fingerprint(fingerprint), f"edit cache {cache_dir}")
            stored = manifest_settings(manifest)
            if stored is not None and settings is not None:
                check_settings(stored if manifest.get("settings") is not None
                               else {k: v for k, v in stored.items() if k in settings},
                               _jsonable(settings, "settings"), f"edit cache {cache_dir}")
        if routing is not None:
            _check_routing(cache_dir, routing)


def _check_routing(cache_dir: Path, routing) -> None:
    """Refuse ``routing`` whose key settings differ from those of the cache's router keys."""
    from ..routing.keys import KeyStore

    path = _keys_path(cache_dir)
    if path.is_symlink():
        raise CacheError(f"router key file {path} is a symbolic link; refusing to follow it")
    if not path.exists():
        return
    try:
        stored = KeyStore.read_routing(path)
    except Exception as e:  # noqa: BLE001 - safetensors/JSON errors: the file is damaged
        raise CacheError(f"router key file {path} is unreadable: {e}") from None
    routing.over(stored, where=f"the router keys of edit cache {cache_dir}", hint="use another cache_dir")


def manifest_settings(manifest: dict) -> dict | None:
    """The edit settings a manifest records (version 1: :data:`LEGACY_SETTINGS`, if it holds groups)."""
    if manifest.get("settings") is not None:
        return dict(manifest["settings"])
    return dict(LEGACY_SETTINGS) if manifest.get("version") == 1 and manifest["groups"] else None


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write(cache_dir / MANIFEST_NAME, _dump_manifest(manifest))


def _shard_shas(manifest: dict) -> dict[str, str]:
    """shard rel path -> recorded sha256 (first seen)."""
    out: dict[str, str] = {}
    for rec in manifest["groups"].values():
        out.setdefault(rec["shard"], rec["sha256"])
    return out


# --------------------------------------------------------------------------------------------
# committing a change: shards, router keys, manifest, removed shards


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into a one-line :class:`CacheError` naming it.

        with _writing(cache_dir / MANIFEST_NAME):
            atomic_write(cache_dir / MANIFEST_NAME, data)
    """
    try:
        yield
    except OSError as e:
        raise CacheError(f"cannot write {path}: {e.strerror or e}") from e


def _copy(manifest: dict) -> dict:
    return json.loads(json.dumps(manifest))


def _referenced(manifest: dict) -> set[str]:
    return {rec["shard"] for rec in manifest["groups"].values()}


def _unlink(paths: Iterable[Path]) -> None:
    """Remove regular files (never through a link), ignoring those already gone."""
    dirs = set()
    for p in paths:
        if _regular(p):
            with contextlib.suppress(OSError):
                p.unlink()
                dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def _keys_path(cache_dir: Path) -> Path:
    from ..routing.keys import KEYS_FILE

    return Path(cache_dir) / KEYS_FILE


def _load_keys(cache_dir: Path, fingerprint: dict | None = None):
    """The cache's router keys (:class:`~lafn_lightning.routing.keys.KeyStore`), or None when it
    has no key file; an unreadable, non-finite or other-backbone file is a :class:`CacheError`."""
    from ..routing.keys import KeyStore

    path = _keys_path(cache_dir)
    if path.is_symlink():
        raise CacheError(f"router key file {path} is a symbolic link; refusing to follow it")
    if not path.exists():
        return None
    try:
        return KeyStore.load(path, fingerprint=fingerprint)
    except FingerprintMismatch:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors/JSON errors: the file is damaged
        raise CacheError(f"router key file {path} is unreadable: {e}") from None


def _save_keys(cache_dir: Path, store) -> None:
    path = _keys_path(cache_dir)
    with _writing(path):
        store.save(path)


def _prune_router_keys(cache_dir: Path, groups) -> list[str]:
    """Drop the router keys of groups no longer in the cache; returns their ids."""
    store = _load_keys(Path(cache_dir))
    gone = store.prune(groups) if store is not None else []
    if gone:
        _save_keys(Path(cache_dir), store)
    return gone


def _commit(cache_dir: Path, manifest: dict, before: dict, *, keys=None) -> None:
    """Make ``manifest`` the cache's (its new shard files already written): the router key file
    first (``keys``, a KeyStore; None leaves the file alone), so no committed group ever lacks its
    keys, then the manifest (the commit point), then the shard files that only ``before`` used are
    removed. A failure before the commit point takes the new groups' keys out again (best effort;
    what is left, ``verify`` reports and ``gc`` removes). Call under the lock.

        _commit(cache_dir, manifest, before, keys=store)
    """
    if keys is not None:
        _save_keys(cache_dir, keys)
    try:
        with _writing(cache_dir / MANIFEST_NAME):
            _write_manifest(cache_dir, manifest)
    except BaseException:
        if keys is not None:
            with contextlib.suppress(Exception):
                _prune_router_keys(cache_dir, before["groups"])
        raise
    _unlink(cache_dir / rel for rel in _referenced(before) - _referenced(manifest))


# --------------------------------------------------------------------------------------------
# writing


def _validate_entry(e: CacheEntry, fp: dict, value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    where = f"cache entry {e.group_id!r}"
    if not isinstance(e.group_id, str) or not e.group_id:
        raise CacheError(f"cache entry group_id must be a non-empty string, got {e.group_id!r}")
    if not isinstance(e.subjects, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in e.subjects.items()
    ):
        raise CacheError(f"{where}: subjects must be a dict language -> subject string")
    layers = [int(x) for x in e.layers]
    if len(set(layers)) != len(layers):
        raise CacheError(f"{where}: duplicate layers {layers}")
    mask, delta = e.mask, e.delta
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise CacheError(f"{where}: mask must be a bool tensor [n_layers, d_ff]")
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point() or delta.shape != mask.shape:
        raise CacheError(
            f"{where}: delta must be a float tensor with the mask's shape {tuple(mask.shape)}, "
            f"got {getattr(delta, 'dtype', None)} {tuple(getattr(delta, 'shape', ()))}"
        )
    if mask.shape[0] != len(layers):
        raise CacheError(f"{where}: mask has {mask.shape[0]} rows but {len(layers)} layers {layers}")
    d_ff = mask.shape[1]
    if "d_ff" in fp and fp["d_ff"] != d_ff:
        raise CacheError(f"{where}: d_ff {d_ff} differs from the fingerprint's d_ff {fp['d_ff']}")
    if isinstance(fp.get("edited_layers"), list) and not set(layers) <= set(fp["edited_layers"]):
        raise CacheError(
            f"{where}: layers {layers} are not all among the fingerprint's edited_layers {fp['edited_layers']}"
        )
    mask_cpu = mask.detach().cpu()
    vals = delta.detach().cpu()[mask_cpu]
    if not torch.isfinite(vals).all():
        raise CacheError(f"{where}: delta has non-finite values (NaN/Inf) on the mask; training diverged "
                         "(lower the learning rate, --model.lr)")
    vals_c = vals.to(value_dtype)
    if not torch.isfinite(vals_c).all():
        top = vals.abs().max().item()
        raise ValueOverflow(f"{where}: delta overflows {str(value_dtype).removeprefix('torch.')} (max |value| "
                            f"{top:.4g}); store it as bfloat16 (--export.value_dtype bfloat16) or lower the learning "
                            "rate (--model.lr)", e.group_id, top)
    return vals_c.contiguous(), pack_mask(mask_cpu), mask_cpu.sum(dim=1).tolist()


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


# --------------------------------------------------------------------------------------------
# reading


class EditCache:
    """Read access (and delete / verify / gc) to an edit cache directory.

    Holds a snapshot of the manifest taken at :meth:`open` (or :meth:`refresh`); tensors are read
    lazily per group from memory-mapped shards by :meth:`entry`.
    """

    def __init__(self, path: Path, manifest: dict, *, check_hashes: bool = True):
        self.path = Path(path)
        self._manifest = manifest
        self.check_hashes = check_hashes
        # (shard, sha256) -> (device, inode, size, mtime) of the file when it was last checked
        # (sha256 when check_hashes) and opened
        self._verified_shards: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        # (shard, sha256) -> open reader, most recently used last (shards are never modified in
        # place, so a reader stays valid for the snapshot that recorded that sha256)
        self._readers: "collections.OrderedDict[tuple[str, str], _ShardReader]" = collections.OrderedDict()

    #: how many shards :meth:`entry` keeps open (memory-mapped)
    MAX_OPEN_SHARDS = 16

    # ---- opening

    @classmethod
    def open(
        cls, cache_dir: str | os.PathLike, fingerprint: dict | None = None, *, check_hashes: bool = True
    ) -> "EditCache":
        """Open the cache in ``cache_dir``. If ``fingerprint`` is given it must equal the cache's
        (else :class:`FingerprintMismatch`). With ``check_hashes`` (default) each shard's sha256
        is checked once, on its first read by :meth:`entry` (and again if the file's inode, size
        or mtime changes). :meth:`entry` keeps up to ``MAX_OPEN_SHARDS`` shards open
        (memory-mapped), so a large shard's header is parsed once."""
        cache_dir = Path(cache_dir)
        manifest = _read_manifest(cache_dir, missing_ok=False)
        if fingerprint is not None:
            check_fingerprint(manifest["fingerprint"], canonical_fingerprint(fingerprint), str(cache_dir))
        return cls(cache_dir, manifest, check_hashes=check_hashes)

    def refresh(self) -> "EditCache":
        """Re-read the manifest (to see groups written by others since open)."""
        manifest = _read_manifest(self.path, missing_ok=False)
        check_fingerprint(self.fingerprint, manifest["fingerprint"], str(self.path))
        self._manifest = manifest
        return self

    # ---- index

    @property
    def settings(self) -> dict | None:
        """How the cached edits were made (site, dtype, layers, locating, loss weights, steps...);
        None for an empty version-1 cache."""
        return manifest_settings(self._manifest)

    @property
    def fingerprint(self) -> dict:
        return json.loads(json.dumps(self._manifest["fingerprint"]))

    @property
    def skipped(self) -> dict[str, str]:
        """Records a whole-dataset run skipped, with the reason (:func:`set_skipped`)."""
        return dict(self._manifest.get("skipped", {}))

    @property
    def group_ids(self) -> list[str]:
        return list(self._manifest["groups"])

    def __len__(self) -> int:
        return len(self._manifest["groups"])

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._manifest["groups"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.group_ids)

    def __repr__(self) -> str:
        return f"EditCache({str(self.path)!r}, groups={len(self)}, backbone={self._manifest['fingerprint'].get('name')!r})"

    def _record(self, group_id: str) -> dict:
        try:
            return self._manifest["groups"][group_id]
        except KeyError:
            raise KeyError(f"group {group_id!r} is not in the edit cache at {self.path}") from None

    def info(self, group_id: str) -> dict:
        """The group's manifest record (a copy): subjects, layers, shard, located counts, meta..."""
        return json.loads(json.dumps(self._record(group_id)))

    def subjects(self, group_id: str) -> dict[str, str]:
        return dict(self._record(group_id)["subjects"])

    def all_subjects(self) -> dict[str, list[str]]:
        """group_id -> the group's distinct subject strings (all languages), in first-seen order."""
        out = {}
        for gid, rec in self._manifest["groups"].items():
            out[gid] = list(dict.fromkeys(s for s in rec["subjects"].values()))
        return out

    # ---- tensors

    def entry(self, group_id: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              *, _retry: bool = True) -> CacheEntry:
        """Load one group: dense ``delta`` [n_layers, d_ff] on ``device`` in ``dtype``, exactly
        zero off the mask. A missing, truncated or corrupt shard, or non-finite values, raise
        :class:`CacheError` naming the shard file and group; nothing is returned half-loaded. A
        shard that a later commit removed (the group was re-edited or deleted since :meth:`open`)
        makes it re-read the manifest once."""
        rec = self._record(group_id)
        shard_path = self.path / rec["shard"]
        key = (rec["shard"], rec["sha256"])
        try:
            st = shard_path.lstat()
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise CacheError(f"cannot read shard file {shard_path}: {e}") from None
        if st is None or not stat_mod.S_ISREG(st.st_mode):
            if _retry and self._moved(group_id):  # replaced or deleted since this snapshot was taken
                return self.entry(group_id, device, dtype, _retry=False)
            raise CacheError(f"shard file {shard_path} of group {group_id!r} is missing or not a regular file")
        state = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified_shards.get(key, state) != state:
            # the file changed since it was checked and opened (shards are never modified in
            # place by this module): check it again, and never read it through an old mapping
            self._verified_shards.pop(key, None)
            self._readers.pop(key, None)
        if self.check_hashes and key not in self._verified_shards:
            try:
                actual = _sha256_file(shard_path)
            except OSError as e:
                raise CacheError(f"cannot read shard file {shard_path}: {e}") from None
            if actual != rec["sha256"]:
                raise CacheError(
                    f"shard file {shard_path} is corrupt or was modified: sha256 {actual[:16]}... "
                    f"!= recorded {rec['sha256'][:16]}... (group {group_id!r})"
                )
        self._verified_shards[key] = state
        try:
            mask, values = _read_group_tensors(shard_path, rec, self._reader(key, shard_path), group_id)
        except CacheError:
            raise
        except Exception as e:  # safetensors errors, bad shapes, ...
            raise CacheError(f"shard file {shard_path} is truncated or corrupt (group {group_id!r}): {e}") from None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        delta = torch.zeros(mask.shape, dtype=dtype)
        delta[mask] = values.to(dtype)
        return CacheEntry(
            group_id=group_id,
            subjects=dict(rec["subjects"]),
            layers=tuple(int(x) for x in rec["layers"]),
            mask=mask.to(dev),
            delta=delta.to(dev),
            meta=json.loads(json.dumps(rec["meta"])),
        )

    def _moved(self, group_id: str) -> bool:
        """Re-read the manifest; True if ``group_id``'s record changed since this snapshot."""
        try:
            fresh = _read_manifest(self.path, missing_ok=False)
        except CacheError:
            return False
        if fresh["groups"].get(group_id) == self._manifest["groups"].get(group_id):
            return False
        check_fingerprint(self.fingerprint, fresh["fingerprint"], str(self.path))
        self._manifest = fresh
        return True

    def usable_group_ids(self) -> list[str]:
        """The groups whose ΔV can be read now (shard present, readable, matching its sha256,
        finite values): what a resumed whole-dataset run need not edit again.

            todo = [g for g in wanted if g not in set(EditCache.open("edit_cache").usable_group_ids())]
        """
        ok = []
        for gid in self.group_ids:
            try:
                self.entry(gid)
            except (CacheError, KeyError):
                continue
            ok.append(gid)
        return ok

    def _reader(self, key: tuple[str, str], shard_path: Path) -> _ShardReader:
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = _ShardReader(shard_path)
            while len(self._readers) > self.MAX_OPEN_SHARDS:
                self._readers.popitem(last=False)
        self._readers.move_to_end(key)
        return reader

    # ---- maintenance

    def delete(self, group_id: str | Iterable[str], *, missing_ok: bool = False) -> None:
        """Remove one group (or several, in one atomic manifest write) from the cache: rolls
        back an edit. A shard no group uses any more is removed in the same commit, and the
        groups' router keys right after it."""
        ids = [group_id] if isinstance(group_id, str) else list(group_id)
        _check_layout(self.path)
        with locked(self.path):
            manifest = _read_manifest(self.path, missing_ok=False)
            check_fingerprint(manifest["fingerprint"], self._manifest["fingerprint"], str(self.path))
            missing = [g for g in ids if g not in manifest["groups"]]
            if missing and not missing_ok:
                raise KeyError(f"groups {missing} are not in the edit cache at {self.path}")
            before = _copy(manifest)
            for g in ids:
                manifest["groups"].pop(g, None)
            _commit(self.path, manifest, before)           # the manifest, then the shards nobody uses
            _prune_router_keys(self.path, manifest["groups"])  # after: the key file always covers the groups
        self._manifest = manifest

    def _scan(self, manifest: dict) -> tuple[list[Path], list[Path]]:
        """(orphan shard files, stale temp files) on disk for ``manifest``."""
        referenced = {rec["shard"] for rec in manifest["groups"].values()}
        orphans, temps = [], []
        shard_dir = self.path / SHARD_DIR
        _check_layout(self.path)
        for d in (self.path, shard_dir):
            if d.is_dir():
                temps += sorted(p for p in d.iterdir()
                                if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX) and _regular(p))
        if shard_dir.is_dir():
            for p in sorted(shard_dir.iterdir()):
                if (p.name.endswith(SHARD_SUFFIX) and not p.name.startswith(".") and _regular(p)
                        and f"{SHARD_DIR}/{p.name}" not in referenced):
                    orphans.append(p)
        return orphans, temps

    def _links(self) -> list[Path]:
        """Entries of ``shards/`` that are not regular files (links, directories, ...)."""
        shard_dir = self.path / SHARD_DIR
        return [p for p in sorted(shard_dir.iterdir()) if not _regular(p)] if shard_dir.is_dir() else []

    def verify(self) -> list[str]:
        """Check the cache on disk against the (freshly re-read) manifest. Returns the problems
        found, one message each: missing shard files, sha256 mismatches, unreadable shards,
        missing tensors or tensors of the wrong dtype/size, mask/count disagreements, shards of
        another backbone, non-finite ΔV, orphan shards and stale temp files, and a router key file
        that is unreadable, non-finite, lacks keys of groups exported with them or holds keys of
        groups not in the cache. ``[]`` means healthy."""
        problems: list[str] = []
        try:
            _check_layout(self.path)
        except CacheError as e:
            return [str(e)]
        with locked(self.path, exclusive=False):
            try:
                manifest = _read_manifest(self.path, missing_ok=False)
            except CacheError as e:
                return [str(e)]
            self._manifest = manifest
            by_shard: dict[str, list[str]] = {}
            for gid, rec in manifest["groups"].items():
                by_shard.setdefault(rec["shard"], []).append(gid)
            for rel, gids in by_shard.items():
                path = self.path / rel
                if path.is_symlink():
                    problems.append(f"shard {path} is a symbolic link (not followed; groups {gids})")
                    continue
                if not _regular(path):
                    problems.append(f"missing shard file {path} (groups {gids})")
                    continue
                shas = {manifest["groups"][g]["sha256"] for g in gids}
                actual = _sha256_file(path)
                if len(shas) > 1 or actual not in shas:
                    problems.append(f"sha256 mismatch for shard file {path}: {actual[:16]}... not the recorded value")
                    continue
                try:
                    reader = _ShardReader(path)
                    md = reader.handle.metadata() or {}
                except Exception as e:
                    problems.append(f"unreadable shard file {path}: {e}")
                    continue
                if "fingerprint" in md:
                    try:
                        shard_fp = json.loads(md["fingerprint"])
                    except json.JSONDecodeError:
                        shard_fp = None
                    if shard_fp != manifest["fingerprint"]:
                        problems.append(f"shard file {path} was written for a different backbone fingerprint")
                for gid in gids:
                    try:
                        _read_group_tensors(path, manifest["groups"][gid], reader, gid)
                    except Exception as e:  # noqa: BLE001 - every problem is reported, none raised
                        problems.append(str(e) if isinstance(e, CacheError) else f"shard file {path}, group {gid!r}: {e}")
            orphans, temps = self._scan(manifest)
            problems += [f"{p} in shards/ is not a regular file (a link or directory; not followed, not removed)"
                         for p in self._links() if f"{SHARD_DIR}/{p.name}" not in by_shard]
            problems += [f"orphan shard file {p} (not referenced by the manifest; remove with `lafn cache gc`)" for p in orphans]
            problems += [f"stale temporary file {p} (left by an interrupted write; remove with `lafn cache gc`)" for p in temps]
            problems += _key_problems(self.path, manifest)
        return problems

    def gc(self, *, dry_run: bool = False) -> list[Path]:
        """Delete what an interrupted write leaves: orphan shards, stale temp files, and router
        keys of groups not in the cache (under the lock, so never a shard a concurrent writer is
        about to index). Only regular files inside the cache are removed; links are never
        followed. Returns the paths removed (or to remove); the router key file is listed when
        keys were (or would be) pruned from it."""
        _check_layout(self.path)
        with locked(self.path):
            manifest = _read_manifest(self.path, missing_ok=False)
            self._manifest = manifest
            orphans, temps = self._scan(manifest)
            victims = orphans + temps
            store = _load_keys(self.path)
            stale_keys = store is not None and any(g not in manifest["groups"] for g in store.group_ids())
            if not dry_run:
                with _writing(self.path / SHARD_DIR):
                    for p in victims:
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                if victims:
                    fsync_dir(self.path / SHARD_DIR)
                if stale_keys:
                    _prune_router_keys(self.path, manifest["groups"])
        return victims + ([_keys_path(self.path)] if stale_keys else [])

    def stats(self) -> dict:
        """Sizes for the current snapshot: groups, shards, bytes on disk (referenced shards +
        manifest), located neurons, bytes per edit, the dense-fp32 size it replaces, and how many
        groups reached their stop rule (``converged``; ``not_converged`` lists the others;
        groups whose export did not record it, e.g. other methods', count in neither)."""
        groups = self._manifest["groups"]
        shards = sorted({r["shard"] for r in groups.values()})
        shard_bytes = 0
        for rel in shards:
            with contextlib.suppress(OSError):
                shard_bytes += (self.path / rel).stat().st_size
        try:
            manifest_bytes = (self.path / MANIFEST_NAME).stat().st_size
        except OSError:
            manifest_bytes = 0
        located = sum(sum(r["located"]) for r in groups.values())
        dense = sum(len(r["layers"]) * r["d_ff"] * 4 for r in groups.values())
        total = shard_bytes + manifest_bytes
        n = len(groups)
        converged = {g: r.get("meta", {}).get("converged") for g, r in groups.items()}
        return {
            "groups": n,
            "shards": len(shards),
            "shard_bytes": shard_bytes,
            "manifest_bytes": manifest_bytes,
            "bytes_on_disk": total,
            "located_neurons": located,
            "located_per_edit": located / n if n else 0.0,
            "bytes_per_edit": total / n if n else 0.0,
            "dense_fp32_bytes": dense,
            "compression_vs_dense_fp32": dense / total if total else 0.0,
            "converged": sum(c is True for c in converged.values()),
            "not_converged": sorted(g for g, c in converged.items() if c is False),
            "skipped": len(self.skipped),
        }


def _key_problems(cache_dir: Path, manifest: dict) -> list[str]:
    """What :meth:`EditCache.verify` finds wrong with the router key file against ``manifest``."""
    path = _keys_path(cache_dir)
    want = [g for g, r in manifest["groups"].items() if r.get("router_key")]
    try:
        store = _load_keys(cache_dir, manifest["fingerprint"])
    except (CacheError, FingerprintMismatch) as e:
        return [str(e)]
    if store is None:
        return [f"missing router key file {path} (groups {want[:5]}{'...' if len(want) > 5 else ''} were exported "
                "with keys)"] if want else []
    problems = []
    missing = [g for g in want if g not in store]
    if missing:
        problems.append(f"router key file {path} has no keys for groups {missing[:5]}{'...' if len(missing) > 5 else ''}"
                        " (delete and edit them again)")
    stale = [g for g in store.group_ids() if g not in manifest["groups"]]
    if stale:
        problems.append(f"router key file {path} holds keys of {len(stale)} group(s) not in the cache "
                        f"({stale[:5]}{'...' if len(stale) > 5 else ''}; left by an interrupted write; remove them "
                        "with `lafn cache gc`)")
    return problems


class _ShardReader:
    """An open (memory-mapped) shard and its tensor names, kept by :class:`EditCache` so that a
    large shard's header is parsed once, not at every group read."""

    __slots__ = ("handle", "keys")

    def __init__(self, shard_path: Path) -> None:
        try:
            self.handle = safe_open(str(shard_path), framework="pt", device="cpu")
            self.keys = frozenset(self.handle.keys())
        except Exception as e:
            raise CacheError(f"shard file {shard_path} is truncated or corrupt: {e}") from None


def _read_group_tensors(shard_path: Path, rec: dict, reader: _ShardReader | None = None,
                        group_id: str = "?", *, where: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool mask [L, d_ff], values [n_located]) of one group, fully validated, finite values
    included (a NaN/Inf ΔV is never served). ``reader``: the shard already open (else it is
    opened for this read). Errors are one :class:`CacheError` line starting with ``where``
    (default ``shard file <path>, group '<id>'``).

        mask, values = _read_group_tensors(path, manifest["groups"]["mzsre:0"], group_id="mzsre:0")
    """
    where = where or f"shard file {shard_path}, group {group_id!r}"
    kv, km = rec["keys"]["values"], rec["keys"]["mask"]
    n_layers, d_ff = len(rec["layers"]), rec["d_ff"]
    try:
        reader = reader if reader is not None else _ShardReader(shard_path)
        for k in (kv, km):
            if k not in reader.keys:
                raise CacheError(f"{where}: no tensor {k!r} in the shard")
        values = reader.handle.get_tensor(kv)
        packed = reader.handle.get_tensor(km)
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{where}: the shard is truncated or corrupt: {e}") from None
    n_located = sum(rec["located"])
    want_dtype = _VALUE_DTYPES[rec["value_dtype"]]
    if values.dtype != want_dtype or values.shape != (n_located,):
        raise CacheError(f"{where}: tensor {kv!r} is {values.dtype} {tuple(values.shape)}, "
                         f"expected {want_dtype} ({n_located},)")
    if not torch.isfinite(values).all():
        raise CacheError(f"{where}: non-finite ΔV values (NaN/Inf); delete the group (lafn cache delete) "
                         "and edit it again")
    if packed.dtype != torch.uint8 or packed.shape != (n_layers, (d_ff + 7) // 8):
        raise CacheError(f"{where}: tensor {km!r} is {packed.dtype} {tuple(packed.shape)}, "
                         f"expected uint8 ({n_layers}, {(d_ff + 7) // 8})")
    try:
        mask = unpack_mask(packed, d_ff)
    except ValueError as e:
        raise CacheError(f"{where}: tensor {km!r}: {e}") from None
    counts = mask.sum(dim=1).tolist()
    if counts != list(rec["located"]):
        raise CacheError(f"{where}: mask {km!r} has per-layer counts {counts}, manifest says {rec['located']}")
    return mask, values


# --------------------------------------------------------------------------------------------
# merging


def _place_file(src: Path, dest: Path, expected_sha: str, link: bool) -> None:
    """Hard-link (or copy) ``src`` to ``dest`` atomically and check its sha256."""
    tmp = tmp_path(dest)
    try:
        linked = False
        if link:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:
                linked = False
        if not linked:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
        actual = _sha256_file(tmp)
        if actual != expected_sha:
            raise CacheError(f"shard file {src} is corrupt or was modified (sha256 mismatch); not merged")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def merge_caches(
    dest_dir: str | os.PathLike,
    sources: list,
    *,
    link: bool = True,
    lock_timeout: float | None = 600.0,
    rename: bool = False,
) -> EditCache:
    """Merge the caches in ``sources`` (directories or :class:`EditCache` objects, e.g. one per
    device or run) into ``dest_dir`` (created if needed; an existing cache there is kept and
    merged into). All fingerprints must agree. Shard files are hard-linked when possible (they are
    never modified in place, so sharing inodes is safe), else copied, and their sha256 checked;
    a name clash with a different file gets a ``-<sha12>`` suffix. Every group's ΔV and the
    router keys are read and must be finite. A group id held by two caches for the same fact:
    later sources win (and sources win over what ``dest_dir`` already held); for different facts
    (:func:`same_fact`) the merge is refused, or with ``rename`` the later one is stored as
    ``<id>#<fact hash>``. The skipped records are united (less those now edited). The router keys
    and then the manifest are written once, atomically, under the destination lock; shards no
    group uses any more are removed in the same commit. Returns the opened destination cache.

        merge_caches("merged", ["rank0", "rank1"], rename=True)
    """
    dest = Path(dest_dir)
    caches = [s if isinstance(s, EditCache) else EditCache.open(s) for s in sources]
    if not caches:
        raise CacheError(f"merge into {dest}: no sources given")
    fp = caches[0].fingerprint
    settings = next((c.settings for c in caches if c.settings is not None), None)
    for c in caches:
        check_settings(settings, c.settings, f"{c.path} (merging with {caches[0].path})")
    for c in caches[1:]:
        check_fingerprint(fp, c.fingerprint, f"{c.path} (merging with {caches[0].path})")
    with _writing(dest):
        _prepare_dir(dest)
    with locked(dest, timeout=lock_timeout):
        manifest = _manifest_for(dest, fp, settings)
        before = _copy(manifest)  # dest as re-read under the lock
        dest_real = dest.resolve()
        plans = []  # (cache, its manifest, {id in it: id in dest})
        owner: dict[str, tuple[dict, Path]] = {g: (r, dest) for g, r in before["groups"].items()}
        for c in caches:
            src_manifest = before if c.path.resolve() == dest_real else c._manifest
            plans.append((c, src_manifest, _merged_ids(dest, c.path, src_manifest["groups"], owner, rename)))
        keys = _merged_router_keys(dest, [(c.path, ids) for c, _, ids in plans], owner)  # refuses before any write
        placed_new: list[Path] = []
        try:
            groups = manifest["groups"]
            for c, src_manifest, ids in plans:
                placed = _place_shards(dest, c.path, src_manifest, link, same_dir=src_manifest is before,
                                       placed_new=placed_new)
                recs = {new_id: {**_copy(src_manifest["groups"][gid]), "shard": placed[src_manifest["groups"][gid]["shard"]]}
                        for gid, new_id in ids.items()}
                _check_values(dest, recs, c.path, {new: old for old, new in ids.items()})  # the placed copies
                for new_id, rec in recs.items():
                    if keys is not None and new_id not in keys:
                        rec.pop("router_key", None)
                    groups.pop(new_id, None)
                    groups[new_id] = rec
            skipped = {**before.get("skipped", {})}
            for c, src_manifest, _ in plans:
                skipped.update(src_manifest.get("skipped", {}))
            skipped = {g: why for g, why in skipped.items() if g not in groups}
            if skipped or "skipped" in manifest:
                manifest["skipped"] = skipped
            fsync_dir(dest / SHARD_DIR)
            _commit(dest, manifest, before, keys=keys)
        except BaseException:
            _unlink(p for p in placed_new if f"{SHARD_DIR}/{p.name}" not in _referenced(before))
            raise
    return EditCache(dest, manifest)


def same_fact(a: dict, b: dict) -> bool:
    """Whether two manifest records of one group id hold the same fact: the content hash of the
    edit (``meta["fact"]``, :attr:`~lafn_lightning.data.EditGroup.digest`) where both record it,
    else the subjects.

        same_fact(cache_a.info("edits:0"), cache_b.info("edits:0"))
    """
    fa, fb = a.get("meta", {}).get("fact"), b.get("meta", {}).get("fact")
    if fa is not None and fb is not None:
        return fa == fb
    return a["subjects"] == b["subjects"]


def _fact_hash(rec: dict) -> str:
    fact = rec.get("meta", {}).get("fact")
    return str(fact) if fact else hashlib.sha256(json.dumps(rec["subjects"], sort_keys=True,
                                                            ensure_ascii=False).encode()).hexdigest()


def _merged_ids(dest: Path, src: Path, src_groups: dict, owner: dict, rename: bool) -> dict[str, str]:
    """Source group id -> its id in the merged cache; refuses (or renames) an id that an earlier
    cache holds for another fact. Updates ``owner`` (merged id -> (record, cache))."""
    ids = {}
    for gid, rec in src_groups.items():
        new_id = gid
        if gid in owner and not same_fact(owner[gid][0], rec):
            if not rename:
                raise CacheError(f"merge into {dest}: group {gid!r} names different facts in {owner[gid][1]} and {src} "
                                 f"(subjects {owner[gid][0]['subjects']} vs {rec['subjects']}); nothing merged "
                                 "(--rename keeps both, the later as <id>#<fact hash>)")
            new_id = f"{gid}#{_fact_hash(rec)[:8]}"
            if new_id in owner and not same_fact(owner[new_id][0], rec):
                raise CacheError(f"merge into {dest}: group {gid!r} of {src} cannot be renamed: {new_id!r} is taken")
        owner[new_id] = (rec, src)
        ids[gid] = new_id
    return ids


def _check_values(cache_dir: Path, records: dict[str, dict], src: Path, src_ids: dict[str, str]) -> None:
    """Read every group of ``records`` (merged group id -> manifest record) from its shard in
    ``cache_dir`` (the placed copies, sha256 checked): refuse a missing shard, bad tensors or
    non-finite ΔV before the commit, naming the group as the source cache ``src`` holds it
    (``src_ids``: merged id -> source id)."""
    readers: dict[str, _ShardReader] = {}
    for gid, rec in records.items():
        path = cache_dir / rec["shard"]
        where = f"merge: group {src_ids[gid]!r} of {src}"
        if not _regular(path):
            raise CacheError(f"{where}: shard file {path} is missing or not a regular file; nothing merged")
        if rec["shard"] not in readers:
            readers[rec["shard"]] = _ShardReader(path)
        try:
            _read_group_tensors(path, rec, readers[rec["shard"]], gid, where=where)
        except CacheError as e:
            raise CacheError(f"{e}; nothing merged") from None


def _place_shards(dest: Path, src_dir: Path, src_manifest: dict, link: bool, *, same_dir: bool,
                  placed_new: list[Path]) -> dict[str, str]:
    """Put the shard files of ``src_manifest`` into ``dest`` (linked or copied, sha256 checked);
    returns source rel -> dest rel and appends the files it created to ``placed_new``."""
    placed: dict[str, str] = {}
    for rel, sha in _shard_shas(src_manifest).items():
        if same_dir:
            placed[rel] = rel
            continue
        src = src_dir / rel
        if not _regular(src):
            raise CacheError(f"merge into {dest}: shard file {src} is missing or not a regular file")
        name = Path(rel).name
        target = dest / SHARD_DIR / name
        if target.is_symlink() or (target.exists() and (not _regular(target) or _sha256_file(target) != sha)):
            stem = name[: -len(SHARD_SUFFIX)]
            target = dest / SHARD_DIR / f"{stem}-{sha[:12]}{SHARD_SUFFIX}"
        if not (_regular(target) and _sha256_file(target) == sha):
            with _writing(target):
                _place_file(src, target, sha, link)
            placed_new.append(target)
        placed[rel] = f"{SHARD_DIR}/{target.name}"
    return placed


def _merged_router_keys(dest: Path, sources: list[tuple[Path, dict[str, str]]], owner: dict):
    """The router keys of ``dest`` and ``sources`` (each with its id renames; later ones win),
    restricted to the merged groups ``owner``; None if no cache has keys."""
    from ..routing.keys import KeyStore

    stores, seen = [], set()
    for path, ids in [(dest, None), *sources]:
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        store = _load_keys(path)
        if store is None:
            continue
        if ids is not None:
            store.prune(ids)
            for old, new in ids.items():
                if old != new and old in store:
                    store.rename(old, new)
        stores.append(store)
    if not stores:
        return None
    try:
        merged = KeyStore.merge(stores)
    except ValueError as exc:
        raise CacheError(f"merge into {dest}: router keys cannot be merged ({exc})") from None
    merged.prune(owner)
    return merged
