"""The ``routing`` section of the config: how the edit router's keys are built and when it fires.

    routing = RoutingSettings(threshold=1.0001, lexical_threshold=0.8748, common_from=3)
    KeyStore.load("edit_cache/router_keys.safetensors").routing   # the settings the keys were built with
    routing.over(store.routing, where="router keys edit_cache/...", hint="use another cache_dir")

The settings travel with the keys: one versioned record (:meth:`RoutingSettings.record`) in the
metadata of ``router_keys.safetensors``, read back by :class:`~lafn_lightning.routing.keys.KeyStore`,
so a cache routes as it was built without the settings being passed again. Two kinds:

- **Key settings** (:data:`KEY_SETTINGS`: ``layer``, ``common_from``) decide what is stored with
  the keys (the states of one layer; background-fact counts only where ``common_from`` > 0). A
  value given must equal the keys': a refit or merge into keys built otherwise is refused.
- **Acceptance settings** (``threshold``, ``lexical_threshold``, ``lexical_tiers``) decide which
  stored group fires. A value given replaces the keys' (a fit records it; an evaluation uses it
  for itself); ``None`` keeps the keys'.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

from .lexical import parse_tiers

__all__ = ["RoutingSettings", "KEY_SETTINGS", "ACCEPTANCE_SETTINGS", "READ_HINT", "RECORD_KEY", "RECORD_VERSION",
           "RENAMED", "router_layer"]

#: the settings that decide what is stored with the keys (must agree with a cache's keys)
KEY_SETTINGS = ("layer", "common_from")
#: the settings that decide which stored group fires (a value given replaces the keys')
ACCEPTANCE_SETTINGS = ("threshold", "lexical_threshold", "lexical_tiers")
#: what a reader of built keys (a routed model, an evaluation) says of a key setting given otherwise
READ_HINT = "give it as built, or null to take the keys'"
#: the key file's metadata entry holding the record, and the record's version
RECORD_KEY, RECORD_VERSION = "routing", 1
#: the options of the cache-export callback the ``routing`` section replaces
RENAMED = {"export.router_keys": "routing.keys", "export.router_threshold": "routing.threshold",
           "export.router_lexical_threshold": "routing.lexical_threshold",
           "export.router_lexical_tiers": "routing.lexical_tiers",
           "export.router_common_from": "routing.common_from"}


def router_layer(layers: Sequence[int] | None) -> int | None:
    """The layer the router keys and reads: the first edited layer (``routing.layer`` and
    ``data.router_layer`` are linked from ``model.layers`` through this).

    >>> router_layer([7, 5, 6])
    5
    """
    return min((int(x) for x in layers or ()), default=None)


@dataclass(frozen=True)
class RoutingSettings:
    """How the edit router is built and when it fires (``routing:`` in a config; docs/router.md).

    >>> RoutingSettings(threshold=1.0001, common_from=3).common_from
    3

    Args:
        keys: write the exported groups' router keys to ``<cache_dir>/router_keys.safetensors``
            (what ``matcher="router"`` routes on).
        threshold: the cosine at which a group's state alone fires (calibrated per backbone and
            layer; above 1: never). None: the keys' (a new key file: not set, so routing asks
            for it).
        lexical_threshold: the lower cosine accepted when half of a subject is spelled in the
            query (the first lexical tier). None: the keys'.
        lexical_tiers: further ``[min_share, min_cosine]`` tiers (or ``[min_share, min_cosine,
            1]``: one end of the subject spelled suffices; ``Router(lexical_tiers=)``). None: the
            keys'.
        common_from: a subject that the questions of at least this many background facts (the
            packaged zsRE training lines) spell is *common* and fires only where its state agrees;
            > 0 stores the groups' counts with the keys (about 7 s per fit). 0: off. None: the
            keys' (a new key file: 0).
        layer: the decoder layer whose input states are keyed and read (linked from
            ``model.layers``: the first edited layer). None: the keys'.
    """

    keys: bool = True
    threshold: float | None = None
    lexical_threshold: float | None = None
    lexical_tiers: list[list[float]] | None = None
    common_from: int | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        """Refuse a malformed value with one line naming its key (``routing.<field>=...: ...``)."""
        def bad(name: str, why: str):
            return ValueError(f"routing.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.keys, bool):
            raise bad("keys", "true or false")
        for name in ("threshold", "lexical_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise bad(name, "a finite cosine (above 1: never reached)")
        if self.lexical_tiers is not None:   # the Router's own check (its base tier supplied later)
            try:
                parse_tiers(self.lexical_tiers, 0.0, 0.0)
            except (ValueError, TypeError) as e:
                raise bad("lexical_tiers", str(e)) from None
        for name, why in (("common_from", "a count of background facts >= 0 (0: off)"),
                          ("layer", "a decoder layer index >= 0")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise bad(name, why)

    # ---- given settings over stored ones -------------------------------------------------------
    def over(self, stored: "RoutingSettings", *, where: str, hint: str) -> "RoutingSettings":
        """``stored`` (the keys' settings) with these given ones applied: a key setting
        (:data:`KEY_SETTINGS`) given must equal the stored one (ValueError, one line: ``where``
        names the keys, ``hint`` what to do), an acceptance setting given replaces it.

        >>> RoutingSettings(threshold=0.9).over(RoutingSettings(threshold=1.0, layer=4), where="k", hint="h")
        RoutingSettings(keys=True, threshold=0.9, lexical_threshold=None, lexical_tiers=None, common_from=None, layer=4)
        """
        for name in KEY_SETTINGS:
            given, kept = getattr(self, name), getattr(stored, name)
            if given is not None and kept is not None and given != kept:
                raise ValueError(f"{where} were built with routing.{name}={kept!r}, not routing.{name}={given!r}; "
                                 f"{hint}")
        return replace(stored, **{f.name: getattr(self, f.name) for f in fields(self)
                                  if f.name != "keys" and getattr(self, f.name) is not None})

    # ---- the record in the key file ------------------------------------------------------------
    def record(self) -> str:
        """The versioned record saved in the key file's metadata (under :data:`RECORD_KEY`)."""
        return json.dumps({"version": RECORD_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "RoutingSettings":
        """The settings a key file's metadata holds: its record, or for a file written before the
        record, the separate entries of that format (absent ones: the defaults of their time)."""
        if RECORD_KEY in meta:
            record = json.loads(meta[RECORD_KEY])
            version = record.pop("version", None)
            if version != RECORD_VERSION:
                raise ValueError(f"routing record version {version!r}: this lafn reads version {RECORD_VERSION}")
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in record.items() if k in known})
        return cls(threshold=json.loads(meta.get("threshold", "null")),
                   lexical_threshold=json.loads(meta.get("lexical_threshold", "null")),
                   lexical_tiers=json.loads(meta.get("lexical_tiers", "[]")),
                   common_from=json.loads(meta.get("common_from", "0")), layer=int(meta["layer"]))
