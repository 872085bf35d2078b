"""Reading an edit cache (:class:`EditCache`) and its maintenance: delete, verify, gc, stats."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import stat as stat_mod
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..backbone.fingerprint import canonical_fingerprint, check_fingerprint
from ..files import TMP_SUFFIX as _TMP_SUFFIX, fsync_dir, locked
from .commit import _commit, _copy, _key_problems, _keys_path, _load_keys, _prune_router_keys, _writing
from .manifest import (MANIFEST_NAME, SHARD_DIR, SHARD_SUFFIX, CacheError, _check_layout, _read_manifest,
                       _regular, _sha256_file, manifest_settings)
from .shards import CacheEntry, _read_group_tensors, _ShardReader


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
