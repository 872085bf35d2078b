"""Merging edit caches (:func:`merge_caches`): one device's or run's cache into another."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..backbone.fingerprint import check_fingerprint
from ..files import fsync_dir, locked, tmp_path
from .commit import _commit, _copy, _merged_router_keys, _referenced, _unlink, _writing
from .edit_cache import EditCache
from .manifest import (SHARD_DIR, SHARD_SUFFIX, CacheError, _manifest_for, _prepare_dir, _regular,
                       _sha256_file, _shard_shas, check_settings)
from .shards import _read_group_tensors, _ShardReader


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
