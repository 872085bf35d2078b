"""Edit routing beyond string matching: which cached groups apply to a query, and at which token.

    router = Router(store, subjects, threshold=0.62)        # store: a KeyStore (router_keys.py)
    routes = router.route(text, spans, states)               # states: token_states(..., store.layer)
    # -> [Route(group_id, position, score, stage)], stage "exact" or "state"

Stage 1, a subject matcher (the paper's exact match by default; fires at the subject's last
token); stage 2,
the query's per-token residual states at ``store.layer`` against every group's keys through a
:class:`VectorIndex`: the best group fires when its best cosine reaches ``threshold``, or
``lexical_threshold`` with part of its subject spelled in the query (both calibrated on other
facts' questions, :func:`calibrate_threshold`).  Its site is :func:`state_site`.

When no cosine can reach ``threshold`` (above 1, as calibrated for the demo backbone), only groups
with lexical support can fire, so :meth:`Router.route` looks those up first (an n-gram inverted
index, :class:`~lafn_lightning.routing.lexical.SubjectGramIndex`) and scores only their keys,
exactly: the lookup cost follows the number of lexical candidates, not the number of cached keys.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..text.matching import SubjectMatcher
from ..text.spans import last_token_of_span
from .keys import KeyStore
from .lexical import SubjectGramIndex, end_supports, lexical_support, parse_tiers

__all__ = ["Route", "VectorIndex", "Router", "state_site", "calibrate_threshold"]

_COS_SLACK = 1e-5  # float32 cosines of unit vectors stay below 1 + _COS_SLACK


@dataclass(frozen=True)
class Route:
    group_id: str
    position: int     # token index in the query's ids
    score: float      # stage 2: the best key's cosine (1.0 for an exact string match)
    stage: str        # the stage-1 matcher's mode ("exact", "fuzzy", ...) or "state"
    rule: str = ""    # where stage 2 put the site: "subject" (a subject string) or "token"


class VectorIndex:
    """Inner-product search over unit vectors, with tombstones for removal.

    ``kind``: ``flat`` (exact scan, a float32 matmul), ``hnsw`` (faiss ``IndexHNSWFlat``,
    approximate, cost nearly flat in the number of keys) or ``auto`` (flat below
    ``auto_hnsw_from`` keys, else hnsw).

    >>> ix = VectorIndex(8, kind="flat"); rows = ix.add(torch.eye(8)[:2])
    >>> ix.search(torch.eye(8)[:1], k=1)[1].tolist()
    [[0]]
    """

    def __init__(self, dim: int, kind: str = "auto", *, auto_hnsw_from: int = 20_000, hnsw_m: int = 32,
                 ef_construction: int = 80, ef_search: int = 64) -> None:
        if kind not in ("auto", "flat", "hnsw"):
            raise ValueError(f"index kind must be auto, flat or hnsw, got {kind!r}")
        self.dim, self.kind, self.auto_hnsw_from = dim, kind, auto_hnsw_from
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self._chunks: list[np.ndarray] = []  # appended rows not yet concatenated (add is O(n))
        self._vecs_cat = np.zeros((0, dim), dtype=np.float32)
        self._alive_chunks: list[np.ndarray] = []
        self._alive_cat = np.zeros(0, dtype=bool)
        self._n = 0
        self._hnsw = None
        self._hnsw_rows = 0  # rows already in the hnsw graph

    def __len__(self) -> int:
        return int(self._alive.sum())

    @property
    def uses_hnsw(self) -> bool:
        return self.kind == "hnsw" or (self.kind == "auto" and self._n >= self.auto_hnsw_from)

    def add(self, vecs: torch.Tensor) -> range:
        """Append unit vectors [n, d]; returns their row numbers."""
        v = np.array(torch.as_tensor(vecs).float().cpu().numpy(), dtype=np.float32, copy=True)
        start = self._n
        self._chunks.append(v)
        self._alive_chunks.append(np.ones(len(v), dtype=bool))
        self._n += len(v)
        return range(start, start + len(v))

    @property
    def _vecs(self) -> np.ndarray:
        if self._chunks:
            self._vecs_cat = np.concatenate([self._vecs_cat, *self._chunks])
            self._chunks = []
        return self._vecs_cat

    @property
    def _alive(self) -> np.ndarray:
        if self._alive_chunks:
            self._alive_cat = np.concatenate([self._alive_cat, *self._alive_chunks])
            self._alive_chunks = []
        return self._alive_cat

    def remove(self, rows: Iterable[int]) -> None:
        self._alive[list(rows)] = False
        dead = len(self._alive) - len(self)
        if dead > 1024 and dead > len(self._alive) // 4:
            self._hnsw, self._hnsw_rows = None, 0  # rebuilt (without tombstones) by the caller
            self.compact_needed = True

    compact_needed = False

    def _graph(self):
        import faiss

        if self._hnsw is None:
            self._hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._hnsw.hnsw.efConstruction = self.ef_construction
            self._hnsw_rows = 0
        if self._hnsw_rows < len(self._vecs):  # incremental: only the new rows
            self._hnsw.add(self._vecs[self._hnsw_rows:])
            self._hnsw_rows = len(self._vecs)
        self._hnsw.hnsw.efSearch = self.ef_search
        return self._hnsw

    def search(self, q: torch.Tensor, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [m, k], rows [m, k])`` of the ``k`` best live rows per query vector (row -1:
        none)."""
        qn = np.ascontiguousarray(torch.as_tensor(q).float().cpu().numpy(), dtype=np.float32)
        n = len(self._vecs)
        if n == 0:
            return np.full((len(qn), k), -np.inf, np.float32), np.full((len(qn), k), -1, np.int64)
        dead = n - len(self)
        if self.uses_hnsw:
            kk = min(n, k + (min(dead, 4 * k) if dead else 0))
            scores, rows = self._graph().search(qn, kk)
        else:
            sim = torch.from_numpy(qn) @ torch.from_numpy(self._vecs).T
            if dead:
                sim[:, torch.from_numpy(~self._alive)] = -np.inf
            top = sim.topk(min(n, k), dim=1)
            scores, rows = top.values.numpy(), top.indices.numpy()
        if dead:
            ok = (rows >= 0) & self._alive[np.clip(rows, 0, None)]
            scores = np.where(ok, scores, -np.inf)
            rows = np.where(ok, rows, -1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return scores[:, :k], rows[:, :k]


def state_site(text: str, spans: Sequence[tuple[int, int]], subjects: Iterable[str], best_token: int) -> tuple[int, str]:
    """Where a stage-2 route injects: the last token of a (fuzzy) occurrence of one of the group's
    subjects in ``text`` -- the rule training uses (``prompts.subject_span``: other/fuzzy) -- else
    the token whose state matched best. Returns ``(position, "subject" | "token")``."""
    subjects = [s for s in subjects if s]
    exact = [(text.find(s), s) for s in sorted(subjects, key=len, reverse=True)]
    for pos, s in exact:
        if pos >= 0:
            tok = last_token_of_span(spans, pos, pos + len(s))
            if tok is not None:
                return tok, "subject"
    found = SubjectMatcher({"g": subjects}, mode="fuzzy").find(text) if subjects else []
    if found:
        m = max(found, key=lambda m: (m.end - m.start, -m.start))
        tok = last_token_of_span(spans, m.start, m.end)
        if tok is not None:
            return tok, "subject"
    return best_token, "token"


class Router:
    """Stage 1 exact subject match + stage 2 nearest keys (see the module docstring).

    Args:
        store: the keys (:class:`KeyStore`); the query states must come from ``store.layer``.
        subjects: group id -> subject strings (every language) for stage 1 and the site rule;
            groups without subjects (e.g. keys-only distractors) route through stage 2 only.
        threshold: minimum cosine for stage 2 (without lexical support).
        lexical_threshold, lexical_min: the lower cosine accepted when at least ``lexical_min``
            of one of the group's subjects is spelled in the query (None: no such rule).
        lexical_tiers: further ``(min_share, min_cosine)`` pairs: a group also fires with a cosine
            of ``min_cosine`` when ``min_share`` (>= ``lexical_min``) of one of its subjects is
            spelled in the query -- an inflected or re-transliterated mention ("Ненада
            Стаменковича" for "Ненад Стаменкович") moves the state at its last token away from the
            keys, while its spelling stays close (docs/router.md). A third element
            ``1`` (``[min_share, min_cosine, 1]``; default 2) lets the tier count a subject with
            only *one* of its ends spelled (with ``edges``): a mention whose other end changed
            («конкурс ИААФ» for "Соревнования ИААФ"), at a cosine calibrated so high that a
            shared word alone ("Thomas Rhett" for "Marlo Thomas") does not reach it
            (docs/router.md).
        edges: the lexical rule counts a subject (or alias) only where both of its ends are spelled
            in the query (:func:`~lafn_lightning.routing.lexical.edges_spelled`): one shared word
            of a longer name ("Thomas Rhett" for "Marlo Thomas", "Sunday" for "Runaway Sunday")
            no longer lowers the cosine a group needs (docs/router.md). False: the
            earlier rule (any ``lexical_min`` of the n-grams).
        common, common_from: group id -> how many background facts spell its subject (the key
            store's :meth:`KeyStore.all_common` by default;
            :func:`~lafn_lightning.routing.lexical.background_facts`) and the count from which a
            subject is *common* (None: the store's ``common_from``; 0: off). A common subject is
            not specific to its edit ("Ali" in "Muhammad Ali", "Canada" in any question about
            Canada): its stage-1 match fires only where stage 2 also accepts the group, and every
            lexical tier needs at least ``lexical_threshold`` for it (docs/router.md).
        aliases: group id -> mention strings (the key store's :meth:`KeyStore.aliases` by
            default): spelled forms that count for the lexical rule and the site, never for
            stage 1 -- an edit prompt's words at an aligned key (its own wording of the subject).
        stage1: the subject matcher of stage 1 (``exact``, ``normalized``, ``fuzzy``; None: off).
        index: ``auto``, ``flat`` or ``hnsw`` (:class:`VectorIndex`); ``k``: neighbours per token.
        candidates: how many best-scoring groups stage 2 tries, in order, against its rule.
        lookup: how :meth:`route` finds stage-2 candidates. ``index``: every group's keys through
            the :class:`VectorIndex` (``k`` nearest keys per token). ``lexical``: only the groups
            with ``lexical_support >= lexical_min`` (a :class:`SubjectGramIndex` over the
            subjects), their keys scored exactly (a matmul with only their rows); valid only when
            no cosine can reach ``threshold`` (``threshold > 1 + 1e-5``: state-only routing off)
            and ``lexical_min > 0``, since then no other group can fire (ValueError otherwise).
            The same rule then accepts the same groups, but groups that can never fire no longer
            take the ``k`` neighbours or the ``candidates`` slots. ``auto`` (default):
            ``lexical`` where valid, else ``index``. :meth:`scores` uses it only when given the
            query ``text`` with ``margins=True``.
    """

    def __init__(self, store: KeyStore, subjects: Mapping[str, Iterable[str]] | None = None, *,
                 threshold: float, lexical_threshold: float | None = None, lexical_min: float = 0.5,
                 stage1: str | None = "exact", index: str = "auto", k: int = 8, candidates: int = 1,
                 lookup: str = "auto", lexical_tiers: Iterable[Sequence[float]] = (),
                 aliases: Mapping[str, Iterable[str]] | None = None, edges: bool = True,
                 common: Mapping[str, int] | None = None, common_from: int | None = None,
                 **index_kwargs) -> None:
        if lookup not in ("auto", "index", "lexical"):
            raise ValueError(f"lookup must be auto, index or lexical, got {lookup!r}")
        self.layer = store.layer
        self.center = store.center
        self.threshold = float(threshold)
        self.lexical_threshold = None if lexical_threshold is None else float(lexical_threshold)
        self.lexical_min = float(lexical_min)
        self.lexical_tiers = parse_tiers(lexical_tiers, self.lexical_min, self.lexical_threshold)
        self.edges = bool(edges)
        self._one_end = self.edges and any(ends == 1 for _, _, ends in self.lexical_tiers)
        self.common_from = int(store.common_from if common_from is None else common_from)
        if self.common_from < 0:
            raise ValueError(f"common_from must be >= 0 (0: off), got {common_from}")
        self._common = dict(store.all_common() if common is None else common)
        self.k = k
        self.candidates = candidates
        self.stage1 = stage1
        self.lookup = lookup
        if lookup == "lexical" and not self._lexical_valid:
            raise ValueError("lookup='lexical' needs threshold > 1 + 1e-5 (no cosine reaches it) and "
                             f"lexical_min > 0, got threshold={threshold}, lexical_min={lexical_min}")
        self._subjects: dict[str, tuple[str, ...]] = {}   # stage 1
        self._forms: dict[str, tuple[str, ...]] = {}      # subjects + aliases: lexical rule, site
        self._aliases = {g: tuple(a) for g, a in (aliases if aliases is not None else store.all_aliases()).items()}
        self._lexical = SubjectGramIndex(self.lexical_min, edges=self.edges) if self.lexical_min > 0 and lookup != "index" else None
        self.matcher = SubjectMatcher({}, mode=stage1 or "exact")
        self.index = VectorIndex(store.dim or 1, kind=index, **index_kwargs)
        self._row_group: list[str] = []
        self._group_rows: dict[str, range] = {}
        self._index_kwargs = dict(kind=index, **index_kwargs)
        subjects = subjects or {}
        self._radius: list[float] = []
        self._radius_arr: np.ndarray | None = None   # _radius as an array, made on demand
        for gid, keys in store.items():
            self.add(gid, keys, subjects.get(gid, ()), store.radii(gid))
        for gid, subs in subjects.items():  # subjects without keys: stage 1 only
            if gid not in self._group_rows:
                self._set_subjects(gid, subs)

    def __len__(self) -> int:
        return len(set(self._group_rows) | set(self._forms))

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._group_rows or group_id in self._forms

    def _set_subjects(self, gid: str, subjects: Iterable[str]) -> None:
        subs = tuple(dict.fromkeys(s for s in ([subjects] if isinstance(subjects, str) else subjects) if s))
        forms = tuple(dict.fromkeys(subs + tuple(a for a in self._aliases.get(gid, ()) if a)))
        if subs:
            self._subjects[gid] = subs
            self.matcher.add(gid, subs)
        if forms:
            self._forms[gid] = forms
            if self._lexical is not None:
                self._lexical.add(gid, forms)

    def add(self, group_id: str, keys: torch.Tensor, subjects: Iterable[str] = (),
            radii: torch.Tensor | None = None, aliases: Iterable[str] | None = None,
            common: int | None = None) -> None:
        """Register (or replace) a group: its keys (unit rows), its subject strings, optional
        per-key radii (a key counts only where its cosine reaches ``max(radius, threshold)``),
        aliases and background-fact count (see the class; None: those the router was built with)."""
        kept = self._aliases.get(group_id, ()) if aliases is None else tuple(aliases)
        count = self._common.get(group_id) if common is None else int(common)
        if group_id in self:
            self.remove(group_id)
        if kept:
            self._aliases[group_id] = kept
        if count is not None:
            self._common[group_id] = count
        keys = torch.as_tensor(keys).float()
        keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        rows = self.index.add(keys)
        r = [-1.0] * len(rows) if radii is None else torch.as_tensor(radii).float().tolist()
        self._radius.extend(r)
        self._radius_arr = None
        self._row_group.extend([group_id] * len(rows))
        self._group_rows[group_id] = rows
        self._set_subjects(group_id, subjects)

    def remove(self, group_id: str) -> None:
        """Forget a group: it never fires again (KeyError if unknown)."""
        if group_id not in self:
            raise KeyError(group_id)
        rows = self._group_rows.pop(group_id, None)
        self._aliases.pop(group_id, None)
        self._common.pop(group_id, None)
        if rows is not None:
            self.index.remove(rows)
        if self._subjects.pop(group_id, None) is not None:
            self.matcher.remove(group_id)
        if self._forms.pop(group_id, None) is not None and self._lexical is not None:
            self._lexical.remove(group_id)
        if self.index.compact_needed:
            self._compact()

    def _compact(self) -> None:
        keep = [(g, self.index._vecs[list(r)], [self._radius[i] for i in r]) for g, r in self._group_rows.items()]
        self.index = VectorIndex(self.index.dim, **self._index_kwargs)
        self._row_group, self._group_rows, self._radius, self._radius_arr = [], {}, [], None
        for g, v, rad in keep:
            rows = self.index.add(torch.from_numpy(v))
            self._radius.extend(rad)
            self._row_group.extend([g] * len(rows))
            self._group_rows[g] = rows
        if self._lexical is not None:
            self._lexical.rebuild()

    @property
    def _lexical_valid(self) -> bool:
        # cosines of unit vectors are <= 1 (+ float32 rounding): state-only routing can never fire
        return self.threshold > 1.0 + _COS_SLACK and self.lexical_min > 0

    @property
    def uses_lexical(self) -> bool:
        """Whether :meth:`route` takes the lexical-first path (see ``lookup``)."""
        return self.lookup != "index" and self._lexical_valid and self._lexical is not None

    def lexical_candidates(self, text: str) -> list[str]:
        """The keyed groups with at least ``lexical_min`` of a subject spelled in ``text`` (what
        :func:`lexical_support` says), in registration order: the only ones the lexical-first
        path scores."""
        return list(self._candidate_support(text))

    def _candidate_support(self, text: str) -> dict[str, tuple[float, float]]:
        """:meth:`lexical_candidates` -> their lexical support with both ends and with one end
        spelled (:func:`~lafn_lightning.routing.lexical.end_supports`; without one-end tiers,
        only the groups with both, twice), in registration order."""
        if self._lexical is None:
            raise ValueError("lexical_candidates needs lexical_min > 0 and lookup auto or lexical")
        support = self._lexical.end_supports(text) if self._one_end else self._lexical.supports_pairs(text)
        rows = self._group_rows
        return {g: support[g] for g in sorted((g for g in support if rows.get(g)), key=lambda g: rows[g].start)}

    @property
    def floor(self) -> float:
        """The lowest cosine that can fire (with lexical support)."""
        return min([self.threshold] + [c for _, c, _ in self.lexical_tiers])

    def cosine_needed(self, support, one_end=None, common=False):
        """The lowest cosine that fires for a group with lexical ``support`` (0..1, both ends
        spelled) and ``one_end`` (one end suffices; None: ``support``) in the query:
        ``threshold``, or the lowest ``min_cosine`` of the lexical tiers that they reach, but at
        least ``lexical_threshold`` for a ``common`` subject (:meth:`is_common`). Floats give a
        float; arrays (one value per group) an array."""
        support = np.asarray(support, dtype=np.float64)
        one = support if one_end is None else np.maximum(support, one_end)
        need = np.full(support.shape, self.threshold)
        for share, c, ends in self.lexical_tiers:
            need = np.where((one if ends == 1 else support) >= share, np.minimum(need, c), need)
        if self.lexical_tiers:
            need = np.where(common, np.maximum(need, self.lexical_tiers[0][1]), need)
        return float(need) if need.ndim == 0 else need

    def is_common(self, group_id: str) -> bool:
        """Whether at least ``common_from`` background facts spell the group's subject (see the
        class; False when ``common_from`` is 0 or the count is unknown)."""
        return self.common_from > 0 and self._common.get(group_id, 0) >= self.common_from

    def accepts(self, text: str, group_id: str, score: float) -> bool:
        """Stage 2's rule: ``score >= threshold``, or ``score >= lexical_threshold`` with at
        least ``lexical_min`` of one of the group's subjects (or aliases) spelled in ``text``
        (:func:`~lafn_lightning.routing.lexical.lexical_support`), or the same for a further
        lexical tier (``lexical_tiers``)."""
        if score >= self.threshold:
            return True
        if not self.lexical_tiers or score < self.floor:
            return False
        forms = self._forms.get(group_id, ())
        common = self.is_common(group_id)
        if self._one_end:
            return score >= self.cosine_needed(*end_supports(text, forms), common=common)
        return score >= self.cosine_needed(lexical_support(text, forms, edges=self.edges), common=common)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Unit states -> key space (centred with the store's vector, re-normalised)."""
        x = torch.as_tensor(states).float()
        if self.center is not None:
            x = x - self.center
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def _lexical_scores(self, states: torch.Tensor, candidates: Sequence[int], text: str
                        ) -> dict[str, tuple[float, int]]:
        if not self.lexical_tiers:  # nothing reaches the floor (threshold > 1)
            return {}
        support = self._candidate_support(text)
        if not support:
            return {}
        gids = list(support)
        first_row = np.fromiter((self._group_rows[g].start for g in gids), np.int64, len(gids))
        n_rows = np.fromiter((len(self._group_rows[g]) for g in gids), np.int64, len(gids))
        starts = np.cumsum(n_rows) - n_rows                                   # group -> its first column
        rows = np.repeat(first_row - starts, n_rows) + np.arange(int(n_rows.sum()))
        # the tokens picked in numpy: torch's indexing with a list cost more than the rest
        x = self.project(torch.from_numpy(
            torch.as_tensor(states).detach().float().cpu().numpy()[np.asarray(candidates, dtype=np.int64)]))
        sim = (x @ torch.from_numpy(self.index._vecs[rows]).T).numpy().astype(np.float64)   # [tokens, rows]
        # each group's floor follows its own lexical support (one tier: lexical_threshold for all)
        sup = np.array(list(support.values()), dtype=np.float64).reshape(len(gids), 2)   # both ends, one end
        floor = self.cosine_needed(sup[:, 0], sup[:, 1], np.fromiter(map(self.is_common, gids), bool, len(gids)))
        limit = np.maximum(self._radius_np[rows], np.repeat(floor, n_rows))
        sim[sim < limit] = -np.inf
        per_token = np.maximum.reduceat(sim, starts, axis=1)                # [tokens, groups]
        best = per_token.max(axis=0)
        first = (per_token == best).argmax(axis=0)                          # earliest best token
        return {g: (float(best[j]), candidates[int(first[j])]) for j, g in enumerate(gids) if best[j] > -np.inf}

    @property
    def _radius_np(self) -> np.ndarray:
        """``_radius`` as an array (re-made after :meth:`add` and :meth:`_compact`)."""
        if self._radius_arr is None:
            self._radius_arr = np.asarray(self._radius, dtype=np.float64)
        return self._radius_arr

    def scores(self, states: torch.Tensor, candidates: Sequence[int], *, margins: bool = False,
               text: str | None = None) -> dict[str, tuple[float, int]]:
        """Group -> (best cosine, token index) over the ``candidates`` tokens of ``states``
        (unit states as :mod:`router_states` returns them; projected here). ``margins``: only
        keys reaching their radius and :attr:`floor` count. ``text`` (the query, with
        ``margins``): where :attr:`uses_lexical`, only the groups that could fire on it
        (:meth:`lexical_candidates`) are scored, exactly (see ``lookup``)."""
        if not len(candidates) or not len(self._row_group):
            return {}
        if text is not None and margins and self.uses_lexical:
            return self._lexical_scores(states, candidates, text)
        sc, rows = self.index.search(self.project(states[list(candidates)]), self.k)
        best: dict[str, tuple[float, int]] = {}
        for t, (srow, rrow) in enumerate(zip(sc, rows)):
            for s, r in zip(srow, rrow):
                if r < 0:
                    continue
                s = float(s)
                if margins:
                    rad = self._radius[r]
                    if s < rad or s < self.floor:
                        continue
                g = self._row_group[r]
                if g not in best or s > best[g][0]:
                    best[g] = (s, candidates[t])
        return best

    def route(self, text: str, spans: Sequence[tuple[int, int]], states: torch.Tensor | None) -> list[Route]:
        """Routes of one query: ``spans`` are its tokens' character spans in ``text`` (empty for
        special tokens, which stage 2 skips); ``states`` [T, d] its unit states at ``self.layer``
        (None: stage 1 only)."""
        routes: list[Route] = []
        held: list[Route] = []   # a common subject's match waits for stage 2 (see the class)
        if self.stage1 and len(self.matcher):
            for m in self.matcher.find(text):
                tok = last_token_of_span(spans, m.start, m.end)
                if tok is not None:
                    r = Route(m.group_id, tok, 1.0, self.stage1, "subject")
                    (held if states is not None and self.is_common(m.group_id) else routes).append(r)
        if states is None:
            return routes
        cand = site_tokens(spans)
        best = self.scores(states, cand, margins=True, text=text)
        routes += [r for r in held if r.group_id in best and self.accepts(text, r.group_id, best[r.group_id][0])]
        if not best:
            return routes
        taken = {r.group_id for r in routes}
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:self.candidates]
        for gid, (score, tok) in ranked:  # the best-scoring candidate that the rule accepts
            if self.accepts(text, gid, score):
                if gid not in taken:
                    pos, rule = state_site(text, spans, self._subjects.get(gid, ()), tok)
                    if rule == "token" and self._aliases.get(gid):   # subjects first, as training
                        pos, rule = state_site(text, spans, self._aliases[gid], tok)
                    routes.append(Route(gid, pos, score, "state", rule))
                break
        return routes


def site_tokens(spans: Sequence[tuple[int, int]]) -> list[int]:
    """The tokens an edit can sit on: non-special ones that end their character span (a character
    split into several byte tokens counts once, at its last token, the token a character span
    maps back to), so a site found here is the site training derives from its characters.

    >>> site_tokens([(0, 0), (0, 1), (0, 1), (1, 2)])
    [2, 3]
    """
    return [i for i, (a, b) in enumerate(spans) if b > a and (i + 1 == len(spans) or tuple(spans[i + 1]) != (a, b))]


def calibrate_threshold(negative_scores: Sequence[float], false_rate: float = 0.0025, floor: float = 0.0) -> float:
    """The threshold that lets through at most ``false_rate`` of the negatives' best scores
    (questions about *other* facts, e.g. zsre-train), never below ``floor``.

    >>> round(calibrate_threshold([0.1, 0.2, 0.3, 0.9], false_rate=0.25), 6)   # only 0.9 passes
    0.3
    """
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))
    if not len(s):
        raise ValueError("calibrate_threshold: no negative scores")
    allowed = int(np.floor(false_rate * len(s)))
    if allowed >= len(s):
        return max(float(s[0]), floor)
    # strictly above the highest negative that must be rejected
    return max(float(np.nextafter(s[len(s) - 1 - allowed], np.inf)), floor)
