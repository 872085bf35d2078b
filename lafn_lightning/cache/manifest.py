"""The edit cache's format names and versions, its errors, and the manifest: reading, validating
and writing ``manifest.json``, the settings and backbone-fingerprint checks, the checks a cache
directory must pass before anything is written into it (:func:`check_target`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import stat as stat_mod
from pathlib import Path
from typing import Any

import torch

from ..backbone.fingerprint import canonical_fingerprint, check_fingerprint
from ..files import LOCK_NAME, atomic_write, check_writable

FORMAT_NAME = "lafn-edit-cache"
FORMAT_VERSION = 2
#: versions this code reads (version 1 has no "settings" record: today's defaults are assumed)
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"

_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------
# errors


class CacheError(RuntimeError):
    """Anything wrong with an edit cache on disk; the message names the file concerned."""


class ValueOverflow(CacheError):
    """A group's ΔV holds values the storage dtype cannot (float16 ends at 65,504; bfloat16 goes
    as far as float32)."""

    def __init__(self, message: str, group_id: str, max_abs: float) -> None:
        super().__init__(message)
        self.group_id, self.max_abs = group_id, max_abs



# --------------------------------------------------------------------------------------------
# small helpers: JSON, time, hashes


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


def _keys_path(cache_dir: str | os.PathLike) -> Path:
    """Where the cache's router key file lives (whether or not it exists)."""
    from ..routing.keys import KEYS_FILE

    return Path(cache_dir) / KEYS_FILE


def _key_file(cache_dir: str | os.PathLike) -> Path | None:
    """The cache's router key file, or None when it has none; a symbolic link is refused."""
    path = _keys_path(cache_dir)
    if path.is_symlink():
        raise CacheError(f"router key file {path} is a symbolic link; refusing to follow it")
    return path if path.exists() else None


def stored_routing(cache_dir: str | os.PathLike):
    """The routing settings recorded with the cache's router keys, or None when it has none;
    an unreadable key file is refused (:class:`CacheError`, one line)."""
    from ..routing.keys import KeyStore

    path = _key_file(cache_dir)
    if path is None:
        return None
    try:
        return KeyStore.read_routing(path)
    except Exception as e:  # noqa: BLE001 - safetensors/JSON errors: the file is damaged
        raise CacheError(f"router key file {path} is unreadable: {e}") from None


def _check_routing(cache_dir: Path, routing) -> None:
    """Refuse ``routing`` whose key settings differ from those of the cache's router keys."""
    stored = stored_routing(cache_dir)
    if stored is not None:
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
