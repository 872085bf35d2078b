"""Committing a change to an edit cache, and the router key file beside the manifest: loading,
saving, pruning, checking and merging the keys; the router keys are written first, then the
manifest (the commit point), then the shard files no group uses any more are removed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from ..backbone.fingerprint import FingerprintMismatch
from ..files import fsync_dir
from .manifest import MANIFEST_NAME, CacheError, _key_file, _keys_path, _regular, _write_manifest


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


def _load_keys(cache_dir: Path, fingerprint: dict | None = None):
    """The cache's router keys (:class:`~lafn_lightning.routing.keys.KeyStore`), or None when it
    has no key file; an unreadable, non-finite or other-backbone file is a :class:`CacheError`."""
    from ..routing.keys import KeyStore

    path = _key_file(cache_dir)
    if path is None:
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

