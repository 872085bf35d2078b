"""Lexical support of a stage-2 route: how much of a group's subject is spelled in the query.

    lexical_support("Когда возникла инициатива ИААФ по многоборью?", ["Соревнования ИААФ по многоборью"])
    # 0.62: share of the subject's character n-grams (folded) found in the query

Query and subjects are folded by :func:`lafn_lightning.text.folding.ngram_fold` (here ``fold``: NFKD,
case-folded, combining marks but Thai/Lao ones dropped, runs of non-letters/digits one space; the
router's thresholds were calibrated on it, docs/router.md); n = 2 for subjects mostly in scripts
written without spaces (:func:`lafn_lightning.text.scripts.mostly_unspaced`: Han, Kana, Thai, Lao,
Khmer, Myanmar), else 3. The score is the best over the group's subjects (every language).

``edges=True`` counts a subject only where both of its ends are spelled (:func:`edges_spelled`):
a query sharing one word of a two-word name ("Thomas Rhett" for "Marlo Thomas", "the good doctor"
for "Call the Doctor") then scores 0, an inflected mention ("Ненада Стаменковича") still counts.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache

import numpy as np

from ..text.folding import ngram_fold as fold
from ..text.scripts import mostly_unspaced

__all__ = ["fold", "parse_tiers", "lexical_support", "end_supports", "edges_spelled", "SubjectGramIndex", "QuestionGramIndex", "background_facts",
           "COMMON_SHARE"]

#: the share of a subject (both ends) that a background question must spell to count for
#: :func:`background_facts`: the lowest further tier of the twelve-language preset
COMMON_SHARE = 0.7


@lru_cache(maxsize=65536)
def _grams(text: str, n: int) -> frozenset[str]:
    t = f" {text} " if n > 2 else text
    return frozenset(t[i:i + n] for i in range(max(1, len(t) - n + 1)))


EDGE_WORD_MIN = 4     # an edge word has at least this many characters (not "the", "la", "по")
EDGE_SHARE = 0.5      # ... at least this share of its own n-grams is in the query
EDGE_PREFIX = 3       # ... and a query word starts with its first characters (inflection changes endings)
EDGE_CHARS = 4        # a subject without word spaces: its first and last characters are the edges
EDGE_CHAR_SHARE = 0.6  # ... with this share of their bigrams in the query


@lru_cache(maxsize=65536)
def _edge_spec(fs: str) -> tuple[tuple[frozenset[str], int, str], ...]:
    """A folded subject's ends as ``(n-grams, hits needed, word start)`` triples. A subject written
    without word spaces: its first and last :data:`EDGE_CHARS` characters, or its first and last
    space-separated part where it has several (a Thai given and family name), as bigrams with
    :data:`EDGE_CHAR_SHARE`, no word start. Else its first and last word of
    :data:`EDGE_WORD_MIN`+ characters (its first and last word where fewer than two are that
    long: ".45 Super" needs its "45"): padded trigrams, :data:`EDGE_SHARE` of them in one query
    word that starts with its first :data:`EDGE_PREFIX` characters (:func:`_end_ok`)."""
    words = fs.split()
    if mostly_unspaced(fs):
        ends = dict.fromkeys((words[0], words[-1]) if len(words) > 1 else (fs[:EDGE_CHARS], fs[-EDGE_CHARS:]))
        return tuple((g, _need(len(g), EDGE_CHAR_SHARE), "") for g in (_grams(e, 2) for e in ends))
    long = [w for w in words if len(w) >= EDGE_WORD_MIN]
    if len(long) < 2:
        long = words
    ends = dict.fromkeys((long[0], long[-1]))
    return tuple((g, _need(len(g), EDGE_SHARE), " " + w[:EDGE_PREFIX]) for w, g in ((w, _grams(w, 3)) for w in ends))


def _end_ok(g: frozenset[str], need: int, start: str, padded: str, qg: frozenset[str]) -> bool:
    """One end of :func:`_edge_spec` spelled in the query: ``need`` of its n-grams ``g``, and, for
    an edge word, in *one* query word that starts with its ``start`` ("Hönne"
    is not spelled by "honkbal ... gewonnen", whose words hold its trigrams between them)."""
    if len(g & qg) < need or start not in padded:
        return False
    if not start:
        return True
    i = padded.find(start)
    while i >= 0:
        j = padded.find(" ", i + 1)
        if len(g & _grams(padded[i + 1:j if j >= 0 else len(padded)], 3)) >= need:
            return True
        i = padded.find(start, i + 1)
    return False


def _ends_spelled(spec: tuple[tuple[frozenset[str], int, str], ...], padded: str, qg: frozenset[str]) -> int:
    """How many ends of a subject (its :func:`_edge_spec`: one or two) are spelled in a query
    (folded, padded with a leading space; ``qg``: its n-grams of the subject's n, :func:`_grams`).
    All of them (``== len(spec)``): both ends; at least one (``> 0``): the one-end rule."""
    return sum(_end_ok(g, need, start, padded, qg) for g, need, start in spec)


def edges_spelled(query: str, subject: str) -> bool:
    """Whether both ends of ``subject`` are spelled in ``query`` (folded; see :func:`_edge_spec`).

    >>> edges_spelled("Wann erscheint das Album von Thomas Rhett?", "Marlo Thomas")
    False
    >>> edges_spelled("Где родился Ненада Стаменковича?", "Ненад Стаменкович")
    True
    """
    q, fs = fold(query), fold(subject)
    spec = _edge_spec(fs)
    return _ends_spelled(spec, f" {q}", _grams(q, 2 if mostly_unspaced(fs) else 3)) == len(spec)


def lexical_support(query: str, subjects: Iterable[str], *, edges: bool = False) -> float:
    """Best share (0..1) of a subject's character n-grams present in ``query``; with ``edges``,
    only over the subjects whose both ends are spelled there (:func:`edges_spelled`)."""
    if edges:
        return end_supports(query, subjects)[0]
    return max((share for _, share, _ in _shares(fold(query), subjects)), default=0.0)


def _shares(q: str, subjects: Iterable[str]) -> Iterator[tuple[str, float, frozenset[str]]]:
    """``(folded subject, share of its n-grams in the folded query q, q's n-grams of its n)`` for
    each non-empty subject."""
    for s in subjects:
        fs = fold(s)
        if fs:
            n = 2 if mostly_unspaced(fs) else 3
            g, qg = _grams(fs, n), _grams(q, n)
            yield fs, len(g & qg) / len(g), qg


def end_supports(query: str, subjects: Iterable[str]) -> tuple[float, float]:
    """``(lexical_support(query, subjects, edges=True), the same over the subjects with at least
    one end spelled)``: the second counts a mention whose other end changed («конкурс ИААФ по
    многоборью» for "Соревнования ИААФ по многоборью"), and "Thomas Rhett" for "Marlo Thomas".

    >>> [round(x, 2) for x in end_supports("Wann erscheint das Album von Thomas Rhett?", ["Marlo Thomas"])]
    [0.0, 0.5]
    >>> [round(x, 2) for x in end_supports("Когда был запущен конкурс ИААФ по многоборью?", ["Соревнования ИААФ по многоборью"])]
    [0.0, 0.58]
    """
    q = fold(query)
    padded = f" {q}"
    both = one = 0.0
    for fs, share, qg in _shares(q, subjects):
        if share > both:   # both <= one: nothing to gain otherwise
            spec = _edge_spec(fs)
            spelled = _ends_spelled(spec, padded, qg)
            if spelled and share > one:
                one = share
            if spelled == len(spec):
                both = share
    return both, one


def _need(g: int, share: float) -> int:
    """The fewest of ``g`` n-grams whose share ``c / g`` reaches ``share`` (g + 1: never), computed
    with the same float division as :func:`lexical_support`, so ``hits >= need`` iff
    ``hits / g >= share``."""
    c = min(g + 1, max(0, math.ceil(share * g)))
    while c > 0 and (c - 1) / g >= share:
        c -= 1
    while c <= g and c / g < share:
        c += 1
    return c


class _Subject:
    __slots__ = ("spec", "id", "n", "grams", "need", "prefix", "hits", "groups")

    def __init__(self, spec, sid: int, n: int, grams: frozenset[str], need: int) -> None:
        self.spec, self.id, self.n, self.grams, self.need = spec, sid, n, grams, need   # spec: _edge_spec
        self.prefix: tuple[str, ...] = ()   # the posted n-grams
        self.hits = 0                       # posted n-grams a passing query must hold (0: never passes)
        self.groups: set[str] = set()


class SubjectGramIndex:
    """Which groups have ``lexical_support(query, subjects) >= min_share``, without scanning them.

    An inverted index from a subject's folded character n-gram to the (folded) subjects, with
    **prefix filtering**: a subject of ``g`` distinct n-grams passes only with ``need`` =
    ceil(min_share * g) of them in the query, so any ``g - need + c`` of its n-grams hold at least
    ``c`` of every passing set; it is posted under its ``g - need + c`` rarest (``c = min(overlap,
    need)``; document frequency at its insertion, re-chosen for all subjects whenever their number
    has doubled), and a query must reach it through ``c`` posted n-grams before it is checked
    exactly (same n-grams, same division as :func:`lexical_support`). The count is one
    ``np.bincount`` over the query's posting lists, kept as integer arrays (re-made, at the next
    query, for the n-grams that adds and removals touched). Which n-grams are posted only changes
    the speed, never the answer: the count bound holds for any choice. ``overlap`` 1 is plain
    prefix filtering; 5 (default) posts four more n-grams per subject and drops the subjects that
    share fewer than five posted n-grams with the query: at 100k groups it checks 12 subjects per
    query where 3 checked 40 and 1 checked 689, in 0.13-0.18 ms against 0.18-0.29 and 2.1-2.5 ms
    (measured with a one-off index benchmark kept in git history).

    >>> ix = SubjectGramIndex(0.5); ix.add("g1", ["Moscow"]); ix.add("g2", ["Bangkok"])
    >>> sorted(ix.groups("Is Moscow big?")), sorted(ix.groups("Is Paris big?"))
    (['g1'], [])
    """

    def __init__(self, min_share: float, *, overlap: int = 5, rebuild_from: int = 256, edges: bool = False) -> None:
        if not min_share > 0:
            raise ValueError(f"SubjectGramIndex needs min_share > 0 (else every group passes), got {min_share}")
        if overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {overlap}")
        self.min_share = float(min_share)
        self.edges = edges  # as lexical_support(..., edges=)
        self.overlap = int(overlap)
        self.rebuild_from = rebuild_from
        self._group_subjects: dict[str, tuple[str, ...]] = {}   # group -> folded subjects
        self._subjects: dict[str, _Subject] = {}                 # folded subject -> entry
        self._by_id: list[_Subject | None] = []                  # subject id -> entry (None: removed)
        self._hits = np.zeros(0, dtype=np.int64)                 # subject id -> posted n-grams needed
        self._post: dict[int, dict[str, set[int]]] = {2: {}, 3: {}}   # n -> n-gram -> subject ids
        self._arrays: dict[int, dict[str, np.ndarray]] = {2: {}, 3: {}}  # the same as arrays ...
        self._dirty: dict[int, set[str]] = {2: set(), 3: set()}        # ... but for these n-grams
        self._df: dict[int, dict[str, int]] = {2: {}, 3: {}}          # n -> n-gram -> subjects holding it
        self._built_for = 0

    def __len__(self) -> int:
        return len(self._group_subjects)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._group_subjects

    def posting_sizes(self) -> list[int]:
        return [len(s) for post in self._post.values() for s in post.values()]

    def _post_subject(self, e: _Subject) -> None:
        df, post, dirty = self._df[e.n], self._post[e.n], self._dirty[e.n]
        g = len(e.grams)
        if e.need > g:   # min_share > 1: never passes
            e.prefix, e.hits = (), 0
            return
        e.hits = min(self.overlap, e.need)
        e.prefix = tuple(sorted(e.grams, key=lambda x: (df[x], x))[:g - e.need + e.hits])
        for x in e.prefix:
            post.setdefault(x, set()).add(e.id)
            dirty.add(x)
        if e.id >= len(self._hits):   # grow by doubling
            grown = np.zeros(max(e.id + 1, 2 * len(self._hits)), np.int64)
            grown[:len(self._hits)] = self._hits
            self._hits = grown
        self._hits[e.id] = e.hits

    def _unpost_subject(self, e: _Subject) -> None:
        post, dirty = self._post[e.n], self._dirty[e.n]
        for x in e.prefix:
            s = post[x]
            s.discard(e.id)
            dirty.add(x)
            if not s:
                del post[x]
        e.prefix, e.hits = (), 0

    def add(self, group_id: str, subjects: Iterable[str]) -> None:
        """Register (or replace) a group's subject strings (every language)."""
        if group_id in self._group_subjects:
            self.remove(group_id)
        folded = tuple(dict.fromkeys(fs for fs in (fold(s) for s in subjects if s) if fs))
        if not folded:
            return
        self._group_subjects[group_id] = folded
        for fs in folded:
            e = self._subjects.get(fs)
            if e is None:
                n = 2 if mostly_unspaced(fs) else 3
                grams = _grams(fs, n)
                spec = _edge_spec(fs) if self.edges else ()
                e = self._subjects[fs] = _Subject(spec, len(self._by_id), n, grams, _need(len(grams), self.min_share))
                self._by_id.append(e)
                df = self._df[n]
                for x in grams:
                    df[x] = df.get(x, 0) + 1
                self._post_subject(e)
            e.groups.add(group_id)
        if len(self._subjects) >= max(self.rebuild_from, 2 * self._built_for):
            self.rebuild()

    def remove(self, group_id: str) -> None:
        """Forget a group (no-op if unknown)."""
        for fs in self._group_subjects.pop(group_id, ()):
            e = self._subjects[fs]
            e.groups.discard(group_id)
            if e.groups:
                continue
            self._unpost_subject(e)
            df = self._df[e.n]
            for x in e.grams:
                df[x] -= 1
                if not df[x]:
                    del df[x]
            del self._subjects[fs]
            self._by_id[e.id] = None

    def rebuild(self) -> None:
        """Re-choose every subject's posted n-grams by the current document frequencies (and
        renumber the subjects without the removed ones' ids)."""
        self._post = {2: {}, 3: {}}
        self._arrays = {2: {}, 3: {}}
        self._dirty = {2: set(), 3: set()}
        self._by_id = list(self._subjects.values())
        self._hits = np.zeros(len(self._by_id), dtype=np.int64)
        for i, e in enumerate(self._by_id):
            e.id = i
            self._post_subject(e)
        self._built_for = len(self._subjects)

    def _refresh_arrays(self) -> None:
        """Re-make the posting arrays of the n-grams that adds and removals touched since the last
        query (all of them, so that one query never pays for another's)."""
        for n, dirty in self._dirty.items():
            post, arrays = self._post[n], self._arrays[n]
            for x in dirty:
                s = post.get(x)
                if s:
                    arrays[x] = np.fromiter(s, np.int64, len(s))
                else:
                    arrays.pop(x, None)
            dirty.clear()

    def groups(self, query: str) -> set[str]:
        """The groups with ``lexical_support(query, their subjects) >= min_share``."""
        return set(self.supports(query))

    def supports(self, query: str) -> dict[str, float]:
        """Group -> ``lexical_support(query, its subjects, edges=self.edges)``, for the groups
        reaching ``min_share``."""
        return {g: both for g, (both, _) in self._scan(query, one_end=False).items()}

    def supports_pairs(self, query: str) -> dict[str, tuple[float, float]]:
        """:meth:`supports` as ``(support, support)`` pairs, the shape of :meth:`end_supports`."""
        return self._scan(query, one_end=False)

    def end_supports(self, query: str) -> dict[str, tuple[float, float]]:
        """Group -> :func:`end_supports` of its subjects (the first 0.0 where it is below
        ``min_share``), for the groups whose second reaches ``min_share``; needs ``edges``."""
        if not self.edges:
            raise ValueError("SubjectGramIndex.end_supports needs edges=True")
        return self._scan(query, one_end=True)

    def reached(self, q: str) -> tuple[dict[int, frozenset[str]], list[_Subject]]:
        """The prefix filter alone, for the folded query ``q``: its n-grams per n, and the
        subjects reached through enough posted n-grams (the only ones :meth:`supports` checks)."""
        self._refresh_arrays()
        qgrams: dict[int, frozenset[str]] = {}
        lists: list[np.ndarray] = []
        for n, arrays in self._arrays.items():
            if not arrays:
                continue
            qgrams[n] = qg = _grams(q, n)
            for x in qg:
                a = arrays.get(x)
                if a is not None:
                    lists.append(a)
        if not lists:
            return qgrams, []
        ids = np.concatenate(lists)
        count = np.bincount(ids)                  # subject id -> its posted n-grams in the query
        return qgrams, [self._by_id[i] for i in np.unique(ids[count[ids] >= self._hits[ids]]).tolist()]

    def _scan(self, query: str, *, one_end: bool) -> dict[str, tuple[float, float]]:
        q = fold(query)
        padded = f" {q}"
        qgrams, reached = self.reached(q)
        both: dict[str, float] = {}
        one: dict[str, float] = {}
        for e in reached:
            qg = qgrams[e.n]
            share = len(e.grams & qg) / len(e.grams)
            if share < self.min_share:
                continue
            spelled = _ends_spelled(e.spec, padded, qg)   # spec (): edges off, every subject counts
            if spelled == len(e.spec):
                for g in e.groups:
                    if share > both.get(g, -1.0):
                        both[g] = share
            if one_end and spelled:
                for g in e.groups:
                    if share > one.get(g, -1.0):
                        one[g] = share
        if not one_end:
            return {g: (v, v) for g, v in both.items()}
        return {g: (both.get(g, 0.0), v) for g, v in one.items()}


class QuestionGramIndex:
    """Questions indexed by their folded character n-grams, for finding the questions that spell a
    subject (:func:`background_facts`) without scanning them all: a subject's n-grams look up the
    questions holding them (one ``np.bincount``), and only those holding ``share`` of them are
    checked exactly (both ends, :func:`_ends_spelled`). The n-grams of each n are indexed at the
    first subject of that n (2: subjects written without spaces, 3: the others).

        index = QuestionGramIndex([(1, "Who was Ali Khan?"), (2, "Where is Alicante?")])
        index.facts_spelling("Ali", 0.7)     # {1}
    """

    def __init__(self, questions: Iterable[tuple[int, str]]) -> None:
        pairs = list(questions)
        self.facts = [fact for fact, _ in pairs]
        self.folded = [fold(q) for _, q in pairs]
        self._postings: dict[int, tuple[dict[str, int], np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.folded)

    def _index(self, n: int) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        """``(n-gram -> row, offsets, question ids)``: row r's questions are ``ids[offsets[r]:offsets[r + 1]]``."""
        if n not in self._postings:
            vocab: dict[str, int] = {}
            grams, owners = [], []
            for i, q in enumerate(self.folded):
                row = [vocab.setdefault(x, len(vocab)) for x in _grams.__wrapped__(q, n)]
                grams.extend(row)
                owners.extend([i] * len(row))
            grams_a = np.asarray(grams, dtype=np.int64)
            order = np.argsort(grams_a, kind="stable")
            offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
            np.cumsum(np.bincount(grams_a, minlength=len(vocab)), out=offsets[1:])
            self._postings[n] = (vocab, offsets, np.asarray(owners, dtype=np.int64)[order])
        return self._postings[n]

    def spelling(self, subject: str, share: float) -> list[int]:
        """The questions (positions) with ``lexical_support(question, [subject], edges=True) >= share``
        (``share`` > 0, as for :class:`SubjectGramIndex`)."""
        if not share > 0:
            raise ValueError(f"QuestionGramIndex.spelling needs share > 0 (else every question spells it), got {share}")
        fs = fold(subject)
        if not fs:
            return []
        n = 2 if mostly_unspaced(fs) else 3
        g = _grams(fs, n)
        need = _need(len(g), share)
        if need > len(g):
            return []
        vocab, offsets, ids = self._index(n)
        rows = [vocab[x] for x in g if x in vocab]
        if len(rows) < need:
            return []
        hits = np.bincount(np.concatenate([ids[offsets[r]:offsets[r + 1]] for r in rows]), minlength=len(self.folded))
        spec = _edge_spec(fs)
        return [i for i in np.flatnonzero(hits >= need).tolist()
                if _ends_spelled(spec, f" {self.folded[i]}", _grams(self.folded[i], n)) == len(spec)]

    def facts_spelling(self, subject: str, share: float) -> set[int]:
        """The fact ids of :meth:`spelling`."""
        return {self.facts[i] for i in self.spelling(subject, share)}


def background_facts(forms: Mapping[str, Iterable[str]], questions: Iterable[tuple[int, str]] | QuestionGramIndex, *,
                     share: float = COMMON_SHARE, own: Mapping[str, int] | None = None) -> dict[str, int]:
    """Group -> how many distinct background facts have a question that spells one of the group's
    ``forms`` (subjects, aliases) with both ends and at least ``share`` of its n-grams
    (:func:`end_supports`). ``questions``: ``(fact id, question)`` pairs about *other* facts (e.g.
    every language of the packaged zsRE training lines, ``routing.build.background_fact_questions``),
    or a :class:`QuestionGramIndex` of them (built once, reused by every call);
    ``own``: a group's own fact id, never counted (a group that is itself a background fact).
    A subject spelled by many other facts' questions ("Canada", "Ali" in "Muhammad Ali") is not
    specific to its edit: the router then needs its state to agree (``Router(common_from=)``).

    >>> background_facts({"g": ["Ali"], "h": ["Lamiinae"]},
    ...                  [(1, "When did Muhammad Ali win?"), (2, "Who was Ali Khan?"), (2, "Ali Khan?")])
    {'g': 2, 'h': 0}
    """
    index = questions if isinstance(questions, QuestionGramIndex) else QuestionGramIndex(questions)
    own = own or {}
    out = {}
    for g, fs in forms.items():
        facts = set().union(*(index.facts_spelling(f, share) for f in dict.fromkeys(fs) if f))
        facts.discard(own.get(g))
        out[g] = len(facts)
    return out


def parse_tiers(extra: Iterable[Sequence[float]], lexical_min: float, lexical_threshold: float | None
                ) -> tuple[tuple[float, float, int], ...]:
    """The lexical rule's tiers (``Router(lexical_tiers=)``) as ``(min_share, min_cosine, ends)``
    triples (``ends`` 2: both ends of the subject spelled, 1: one suffices; given pairs get 2), the
    first from ``lexical_min`` / ``lexical_threshold``; ValueError for a share below
    ``lexical_min`` (the lexical index finds only groups reaching that), ends other than 1 or 2,
    or tiers without a base lexical threshold.

    >>> parse_tiers([[0.7, 0.6]], 0.5, 0.87)
    ((0.5, 0.87, 2), (0.7, 0.6, 2))
    """
    out = []
    for t in extra:
        if len(t) not in (2, 3) or (len(t) == 3 and t[2] not in (1, 2)):
            raise ValueError(f"a lexical tier is [min_share, min_cosine] or [min_share, min_cosine, ends 1|2], got {list(t)}")
        out.append((float(t[0]), float(t[1]), int(t[2]) if len(t) == 3 else 2))
    if lexical_threshold is None:
        if out:
            raise ValueError("lexical_tiers need lexical_threshold (the first tier)")
        return ()
    for share, _, _ in out:
        if not lexical_min <= share <= 1:
            raise ValueError(f"lexical tier share {share} must lie in [lexical_min={lexical_min}, 1]")
    return ((lexical_min, float(lexical_threshold), 2), *sorted(out))
