"""The router's keys: per edit group, unit vectors from the backbone's residual stream, on disk.

    store = KeyStore(layer=4, fingerprint=fp)
    store.add("mzsre:0", keys)            # [n, d] float, any n
    store.save(cache_dir / "router_keys.safetensors")
    store = KeyStore.load(path, fingerprint=fp)   # FingerprintMismatch if another backbone
    store.routing                         # the RoutingSettings the keys were built with
    merged = KeyStore.merge([a, b])       # later stores win on duplicate group ids

One safetensors file (fp16 key tensors, the fp32 centring vector; metadata: format, layer,
dimension, the routing record (:class:`~lafn_lightning.routing.settings.RoutingSettings`:
thresholds, lexical tiers, ``common_from``, layer; versioned), group ids, each group's aliases and
background-fact count, and the backbone fingerprint as JSON), written atomically.
``remove``/``prune`` forget groups (e.g. those deleted from the edit cache).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..backbone.fingerprint import FingerprintMismatch, fingerprints_differ
from ..files import atomic_write
from .settings import RECORD_KEY, RoutingSettings

__all__ = ["KEYS_FILE", "KeyStore"]

KEYS_FILE = "router_keys.safetensors"
_FORMAT = "lafn-router-keys"


class KeyStore:
    """Group id -> keys [n, d] (stored fp16, unit L2 norm), taken at input of decoder ``layer``.

    >>> s = KeyStore(layer=4); s.add("g", torch.randn(3, 8)); len(s), s.dim
    (1, 8)
    """

    def __init__(self, layer: int, fingerprint: dict | None = None, dim: int | None = None, *,
                 center: torch.Tensor | None = None, threshold: float | None = None,
                 lexical_threshold: float | None = None,
                 lexical_tiers: list[list[float]] | None = None, common_from: int = 0) -> None:
        self.layer = int(layer)
        self.fingerprint = dict(fingerprint or {})
        self.dim = dim if dim is not None else (len(center) if center is not None else None)
        #: mean unit state of ordinary text, removed before comparing (the residual stream is
        #: anisotropic: raw unit states of unrelated tokens have cosines ~0.97)
        self.center = None if center is None else torch.as_tensor(center).float().cpu()
        self.threshold = threshold  # the calibrated acceptance cosines, if known
        self.lexical_threshold = lexical_threshold
        #: further [min_share, min_cosine(, ends)] tiers of the lexical rule (``Router(lexical_tiers=)``)
        self.lexical_tiers = [list(map(float, t)) for t in (lexical_tiers or [])]
        #: groups spelled by at least this many background facts need their state to agree
        #: (``Router(common_from=)``; 0: off)
        self.common_from = int(common_from or 0)
        self._keys: dict[str, torch.Tensor] = {}
        self._radii: dict[str, torch.Tensor] = {}
        self._aliases: dict[str, list[str]] = {}
        self._common: dict[str, int] = {}   # group -> background facts spelling it (set_common)

    @property
    def routing(self) -> RoutingSettings:
        """The routing settings of these keys (saved with them as one record; docs/router.md)."""
        return RoutingSettings(threshold=self.threshold, lexical_threshold=self.lexical_threshold,
                               lexical_tiers=[list(t) for t in self.lexical_tiers], common_from=self.common_from,
                               layer=self.layer)

    @routing.setter
    def routing(self, settings: RoutingSettings) -> None:
        if settings.layer is not None and settings.layer != self.layer:
            raise ValueError(f"router keys of layer {self.layer} cannot take routing.layer={settings.layer}")
        self.threshold, self.lexical_threshold = settings.threshold, settings.lexical_threshold
        self.lexical_tiers = [list(map(float, t)) for t in (settings.lexical_tiers or [])]
        self.common_from = int(settings.common_from or 0)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Unit states (``router_states``) -> the space keys live in: centred, re-normalised."""
        x = torch.as_tensor(states).float()
        if self.center is not None:
            x = x - self.center.to(x.device)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    # ---- content ---------------------------------------------------------------------------
    def add(self, group_id: str, keys: torch.Tensor, radii: torch.Tensor | None = None,
            aliases: Iterable[str] = ()) -> None:
        """Register (or replace) a group's keys; rows are L2-normalised and stored as fp16.
        ``radii`` [n]: per-key acceptance cosines (GRACE-like; see ``router_build.set_radii``).
        ``aliases``: the group's mention strings for the router's lexical rule
        (``routing.build.mention_alias``)."""
        keys = torch.as_tensor(keys).detach().float().cpu()
        if keys.dim() == 1:
            keys = keys[None]
        if keys.dim() != 2 or not len(keys):
            raise ValueError(f"{group_id}: keys must be [n>0, d], got {tuple(keys.shape)}")
        if self.dim is None:
            self.dim = keys.shape[1]
        elif keys.shape[1] != self.dim:
            raise ValueError(f"{group_id}: keys have dimension {keys.shape[1]}, store has {self.dim}")
        keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        self._keys[str(group_id)] = keys.half().contiguous()
        self._radii.pop(str(group_id), None)
        self._aliases.pop(str(group_id), None)
        self._common.pop(str(group_id), None)
        if aliases:
            self._aliases[str(group_id)] = list(dict.fromkeys(aliases))
        if radii is not None:
            self.set_radii(group_id, radii)

    def set_radii(self, group_id: str, radii: torch.Tensor) -> None:
        radii = torch.as_tensor(radii).float().reshape(-1).cpu()
        if len(radii) != len(self._keys[str(group_id)]):
            raise ValueError(f"{group_id}: {len(radii)} radii for {len(self._keys[str(group_id)])} keys")
        self._radii[str(group_id)] = radii.contiguous()

    def radii(self, group_id: str) -> torch.Tensor | None:
        return self._radii.get(str(group_id))

    def aliases(self, group_id: str) -> list[str]:
        return list(self._aliases.get(str(group_id), ()))

    def all_aliases(self) -> dict[str, list[str]]:
        """Group id -> aliases, for the groups that have any."""
        return {g: list(a) for g, a in self._aliases.items()}

    def set_common(self, counts: Mapping[str, int]) -> None:
        """Store how many background facts spell each group's subject
        (:func:`~lafn_lightning.routing.lexical.background_facts`), for stored groups."""
        for g, n in counts.items():
            if str(g) in self._keys:
                self._common[str(g)] = int(n)

    def all_common(self) -> dict[str, int]:
        """Group id -> background-fact count, for the groups that have one."""
        return dict(self._common)

    def remove(self, group_id: str) -> None:
        """Forget a group (KeyError if absent)."""
        del self._keys[str(group_id)]
        self._radii.pop(str(group_id), None)
        self._aliases.pop(str(group_id), None)
        self._common.pop(str(group_id), None)

    def rename(self, old: str, new: str) -> None:
        """Store group ``old``'s keys (radii, aliases, counts) under ``new`` (e.g. a merge that
        keeps two facts with one id apart); nothing happens if ``old`` is absent."""
        for table in (self._keys, self._radii, self._aliases, self._common):
            if str(old) in table:
                table[str(new)] = table.pop(str(old))

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Forget every group not in ``keep`` (e.g. the edit cache's group ids); returns them."""
        keep = set(map(str, keep))
        gone = [g for g in self._keys if g not in keep]
        for g in gone:
            del self._keys[g]
            self._radii.pop(g, None)
            self._aliases.pop(g, None)
            self._common.pop(g, None)
        return gone

    def keys(self, group_id: str) -> torch.Tensor:
        return self._keys[str(group_id)]

    def group_ids(self) -> list[str]:
        return list(self._keys)

    def items(self):
        return self._keys.items()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, group_id: object) -> bool:
        return str(group_id) in self._keys

    @property
    def n_keys(self) -> int:
        return sum(len(k) for k in self._keys.values())

    # ---- disk ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + ``os.replace``); returns the path."""
        path = Path(path)
        meta = {"format": _FORMAT, "layer": str(self.layer), "dim": str(self.dim or 0),
                RECORD_KEY: self.routing.record(),
                "common": json.dumps([self._common.get(g) for g in self._keys]),
                "aliases": json.dumps([self._aliases.get(g, []) for g in self._keys], ensure_ascii=False),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "groups": json.dumps(list(self._keys))}
        tensors = {f"k{i}": k for i, k in enumerate(self._keys.values())}  # ids may hold any char
        tensors.update({f"r{i}": self._radii[g] for i, g in enumerate(self._keys) if g in self._radii})
        if self.center is not None:
            tensors["center"] = self.center.float().contiguous()
        atomic_write(path, st_save(tensors, metadata=meta))
        return path

    @staticmethod
    def _metadata(f, path) -> tuple[dict, RoutingSettings]:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a router key file (format {meta.get('format')!r})")
        try:
            return meta, RoutingSettings.from_metadata(meta)
        except (ValueError, TypeError) as e:
            raise ValueError(f"router key file {path}: {e}") from None

    @classmethod
    def read_routing(cls, path: str | os.PathLike) -> RoutingSettings:
        """The routing settings of a key file, from its metadata alone (no key is read)."""
        with safe_open(str(path), framework="pt") as f:
            return cls._metadata(f, path)[1]

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: dict | None = None) -> "KeyStore":
        """Read a key file; with ``fingerprint``, raise :class:`FingerprintMismatch` if it differs;
        a non-finite key, radius or centring vector is a ValueError naming the group. A file
        without the routing record has the settings of its separate entries (or their defaults)."""
        with safe_open(str(path), framework="pt") as f:
            meta, routing = cls._metadata(f, path)
            fp = json.loads(meta["fingerprint"])
            if fingerprint is not None:
                diff = fingerprints_differ(fp, fingerprint)
                if diff:
                    raise FingerprintMismatch(f"router keys {path} were built on another backbone: "
                                              f"{', '.join(diff)}", diff)
            center = f.get_tensor("center") if "center" in f.keys() else None
            store = cls(int(meta["layer"]), fp, int(meta["dim"]) or None, center=center)
            store.routing = routing
            names = set(f.keys())
            ids = json.loads(meta["groups"])
            aliases = json.loads(meta.get("aliases", "null")) or [[]] * len(ids)
            common = json.loads(meta.get("common", "null")) or [None] * len(ids)   # older files: none
            for i, gid in enumerate(ids):
                store._keys[gid] = f.get_tensor(f"k{i}")
                if common[i] is not None:
                    store._common[gid] = int(common[i])
                if aliases[i]:
                    store._aliases[gid] = list(aliases[i])
                if f"r{i}" in names:
                    store._radii[gid] = f.get_tensor(f"r{i}")
        store._check_finite(path)
        return store

    def _check_finite(self, path) -> None:
        """Refuse NaN/Inf anywhere in the store (a key that matches nothing, or everything)."""
        if self.center is not None and not torch.isfinite(self.center).all():
            raise ValueError(f"router key file {path}: the centring vector has non-finite values (NaN/Inf)")
        for table, what in ((self._keys, "keys"), (self._radii, "radii")):
            for gid, t in table.items():
                if not torch.isfinite(t).all():
                    raise ValueError(f"router key file {path}: group {gid!r} has non-finite {what} (NaN/Inf)")

    @classmethod
    def merge(cls, stores: Iterable["KeyStore"]) -> "KeyStore":
        """One store with every group of ``stores`` (same fingerprint and key settings, layer and
        ``common_from``, required; the first store's acceptance settings; later stores win on
        duplicate group ids)."""
        stores = list(stores)
        if not stores:
            raise ValueError("merge: no stores given")
        first = stores[0]
        out = cls(first.layer, first.fingerprint, first.dim, center=first.center)
        out.routing = first.routing
        for s in stores:
            RoutingSettings(layer=s.layer, common_from=s.common_from).over(
                first.routing, where="merge: router keys", hint="only keys built alike merge")
            if s.dim and first.dim and s.dim != first.dim:
                raise ValueError(f"merge: key dimensions differ ({s.dim} vs {first.dim})")
            if (s.center is None) != (first.center is None) or (  # fp noise across devices is fine
                    s.center is not None and not torch.allclose(s.center, first.center, atol=1e-3)):
                raise ValueError("merge: the stores were built with different centring vectors")
            diff = fingerprints_differ(first.fingerprint, s.fingerprint)
            if diff:
                raise FingerprintMismatch(f"merge: router keys of different backbones: {', '.join(diff)}", diff)
            for gid, k in s.items():
                out._keys.pop(gid, None)
                out._keys[gid] = k
                out._radii.pop(gid, None)
                out._aliases.pop(gid, None)
                out._common.pop(gid, None)
                if gid in s._common:
                    out._common[gid] = s._common[gid]
                if s.radii(gid) is not None:
                    out._radii[gid] = s.radii(gid)
                if s.aliases(gid):
                    out._aliases[gid] = s.aliases(gid)
        return out

    @classmethod
    def from_mapping(cls, layer: int, keys: Mapping[str, torch.Tensor], fingerprint: dict | None = None) -> "KeyStore":
        store = cls(layer, fingerprint)
        for gid, k in keys.items():
            store.add(gid, k)
        return store
