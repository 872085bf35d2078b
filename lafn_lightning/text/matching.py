"""Find the subjects of cached edit groups in a query: ``exact`` (the paper's), ``normalized``, ``fuzzy``.

    matcher = SubjectMatcher({"mzsre:0": ["IAAF Combined Events Challenge", "国际田联混合项目挑战赛"]})
    matcher.find("When was the inception of IAAF Combined Events Challenge?")  # [Match(...)]

Precision over recall (a false match changes an unrelated answer); lookup cost does not grow
with the number of groups. The rules of each mode and their known limits: docs/matching.md.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

import ahocorasick

from .folding import fold_accents, fold_case
from .scripts import is_unspaced

__all__ = ["MATCHERS", "Match", "SubjectMatcher"]

MATCHERS = ("exact", "normalized", "fuzzy")


@dataclass(frozen=True)
class Match:
    """One subject occurrence: ``text[start:end]`` in the original query is the subject."""

    group_id: str
    subject: str  # the cached subject string that matched
    start: int  # character span [start, end) in the ORIGINAL query text
    end: int


# --------------------------------------------------------------------------- character classes

# Punctuation that carries meaning inside names ("C#", "AT&T", "100%", the titles "Shake!",
# "Help!"): kept as tokens.
_SYMBOL_PUNCT = frozenset("#%&@*§†‡!?")

# Marks that attach to the preceding character (besides Unicode M*): half-width (semi-)voiced
# sound marks, so that NFKC turns "ｶﾞ" into "ガ".
_EXTRA_COMBINING = frozenset("\uff9e\uff9f")

_WORD, _NOSPACE, _SYMBOL, _SEP, _IGNORE = "word", "nospace", "symbol", "sep", "ignore"


@lru_cache(maxsize=8192)
def _char_class(ch: str) -> str:
    cat = unicodedata.category(ch)
    if cat == "Cf":  # soft hyphen, zero-width space/joiners, BOM
        return _IGNORE
    if cat[0] in "LNM":
        return _NOSPACE if is_unspaced(ch) else _WORD
    if cat[0] == "S" or ch in _SYMBOL_PUNCT:
        return _SYMBOL
    return _SEP  # whitespace, other punctuation, controls, unassigned


def _is_combining(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "M" or ch in _EXTRA_COMBINING


def _is_spaced_word_char(ch: str) -> bool:
    return _char_class(ch) == _WORD


# --------------------------------------------------------------------------- tokenisation


def _clusters(text: str) -> Iterator[tuple[int, int]]:
    """Spans of character clusters: a base character plus the combining marks after it."""
    n, i = len(text), 0
    while i < n:
        j = i + 1
        while j < n and _is_combining(text[j]):
            j += 1
        yield i, j
        i = j


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """Normalized tokens of ``text`` as (token, start, end), offsets into ``text``."""
    out: list[tuple[str, int, int]] = []
    buf: list[str] = []  # the word being built
    buf_kind = ""  # "L" (letters) or "D" (digits)
    buf_start = buf_end = 0

    def flush() -> None:
        nonlocal buf, buf_kind
        if buf:
            out.append(("".join(buf), buf_start, buf_end))
        buf, buf_kind = [], ""

    for start, end in _clusters(text):
        cls = _char_class(text[start])
        if cls == _IGNORE:
            continue
        if cls != _WORD:
            flush()
            if cls in (_NOSPACE, _SYMBOL):
                norm = fold_case(text[start:end])
                if norm.strip():
                    out.append((norm, start, end))
            continue
        for ch in fold_case(text[start:end]):  # NFKC may expand: "ﬁ" -> "fi", "①" -> "1"
            cat = unicodedata.category(ch)[0]
            kind = "D" if cat == "N" else "L" if cat in "LM" else ""
            if kind != buf_kind:
                flush()
                if not kind:
                    continue
                buf_kind, buf_start = kind, start
            buf.append(ch)
            buf_end = end
    flush()
    return out


# --------------------------------------------------------------------------- fuzzy stems
# (tokens are folded first: fold_accents of text/folding.py)

# Inflectional endings, language-agnostic per script (applied after folding).  Kept short on
# purpose: every ending pair is a chance to confuse two different names.
_MIN_STEM = 3
_ENDINGS = {
    "latin": frozenset(
        # vowels (Slavic/Romance/Turkish cases, gender), plurals/genitives, Latin nominatives
        "a e i o u y s es os as us en em ou ym "
        # Czech: case endings, -ho after names in -y (Anthonyho), possessive -ův, and the
        # feminine surname suffix -ová/-ové/-ovou (Seymour ~ Seymourové)
        "ach ech ich ych ami emi ymi imi ovi emu eho iho imu ymu ho uv ova ove ovou "
        # Turkish case endings after a possessive (İstasyonu ~ İstasyonunun)
        "nin nun nu nda nde ndan nden".split()
    ),
    "cyrillic": frozenset(
        fold_accents(e)
        for e in (
            "а я о е ы и у ю ь й "
            "ой ей ий ый ая яя ое ее ые ие ую юю ом ем ам ям ах ях ым им ых их "
            "ою ею ью ья ье ия ию ии ого его ому ему ами ями ыми ими иях иям"
        ).split()
    ),
}
_MAX_ENDING = max(len(e) for endings in _ENDINGS.values() for e in endings)


# Turkish case suffixes and English "'s", set off from a name by an apostrophe
# ("Leedstown'u", "Ferrers'in", "Paris's"): the fuzzy matcher skips them.
_APOSTROPHES = frozenset("'’ʼ‘`´")
_CLITICS = frozenset(
    "s i u a e in un nin nun yi yu ya ye de da te ta den dan ten tan le la yle yla li lu "
    "ki nde nda nden ndan ne na ni nu si su".split()
)


def _inflecting_script(word: str) -> str | None:
    if all(ch.isalpha() and (ord(ch) < 0x250 or 0x1E00 <= ord(ch) <= 0x1EFF) for ch in word):
        return "latin"
    if all(ch.isalpha() and 0x400 <= ord(ch) <= 0x52F for ch in word):
        return "cyrillic"
    return None


@lru_cache(maxsize=65536)
def _analyses(word: str) -> tuple[tuple[str, str], ...]:
    """Ways to read a folded word as stem + ending: always (word, ''), plus stripped endings."""
    out = [(word, "")]
    script = _inflecting_script(word)
    if script is None:
        return tuple(out)
    endings = _ENDINGS[script]
    for k in range(1, min(_MAX_ENDING, len(word) - _MIN_STEM) + 1):
        if word[-k:] in endings:
            out.append((word[:-k], word[-k:]))
    if script == "latin" and word.endswith("ze") and len(word) - 2 >= _MIN_STEM - 1:
        out += [(word[:-2] + "h", "e"), (word[:-2] + "g", "e")]  # Czech: Praha -> Praze
    return tuple(out)


def _single_word_ok(stem: str, subject_ending: str, text_ending: str) -> bool:
    """May a one-word subject match a word that differs from it in accents or ending?
    Only with a long enough stem: short words differ in meaning by one letter or accent."""
    if len(stem) >= 5:
        return True
    return len(stem) >= 4 and len(subject_ending) <= 1 and len(text_ending) <= 1


# --------------------------------------------------------------------------- indexes

_Hit = tuple[int, int, str, str]  # start, end, group_id, subject


def _utf8_letters(text: str) -> str:
    """``text`` as one letter per UTF-8 byte (U+0000..U+00FF), for the exact automaton."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


def _utf8_length(ch: str) -> int:
    cp = ord(ch)
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


class _ExactIndex:
    """Aho-Corasick automaton over the raw subject strings, run on their UTF-8 bytes.

    pyahocorasick finds a node's child by a linear scan of its children, so on characters a
    node with thousands of children (the root, once many Chinese or Thai subjects start with
    thousands of distinct characters) costs time proportional to the number of cached subjects.
    Over UTF-8 bytes a node has at most 256 children whatever the cache size; UTF-8 is
    self-synchronising, so a subject's bytes only ever match at character boundaries.
    """

    def __init__(self) -> None:
        self._automaton = ahocorasick.Automaton()
        self._owners: dict[str, dict[tuple[str, str], None]] = {}  # key -> (group, subject)
        self._dirty = False

    def add(self, group_id: str, subject: str) -> None:
        key = subject.strip()
        if not key:
            return
        if key not in self._owners:
            self._owners[key] = {}
            self._automaton.add_word(_utf8_letters(key), key)
            self._dirty = True
        self._owners[key][(group_id, subject)] = None

    def remove(self, group_id: str, subject: str) -> None:
        key = subject.strip()
        owners = self._owners.get(key)
        if owners is None:
            return
        owners.pop((group_id, subject), None)
        if not owners:
            del self._owners[key]
            self._automaton.remove_word(_utf8_letters(key))
            self._dirty = True

    def search(self, text: str) -> Iterator[_Hit]:
        if not self._owners:
            return
        if self._dirty:
            self._automaton.make_automaton()
            self._dirty = False
        char_at: dict[int, int] | None = None  # byte offset -> character offset
        for last, key in self._automaton.iter(_utf8_letters(text)):
            if char_at is None:
                if text.isascii():
                    char_at = {}
                else:
                    char_at, b = {0: 0}, 0
                    for i, ch in enumerate(text, 1):
                        b += _utf8_length(ch)
                        char_at[b] = i
            end = char_at.get(last + 1, last + 1)
            start = end - len(key)
            if end < len(text) and _is_combining(text[end]):
                continue  # would end inside a character cluster
            before = text[start - 1] if start > 0 else " "
            after = text[end] if end < len(text) else " "
            if _is_spaced_word_char(key[0]) and _is_spaced_word_char(before):
                continue  # would start inside a word
            if _is_spaced_word_char(key[-1]) and _is_spaced_word_char(after):
                continue  # would end inside a word
            for group_id, subject in self._owners[key]:
                yield start, end, group_id, subject


class _Node:
    __slots__ = ("children", "entries")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        # (group_id, subject) -> the subject's normalized tokens; in insertion order
        self.entries: dict[tuple[str, str], tuple[str, ...]] = {}


class _TokenIndex:
    """Trie over subjects' token sequences (``normalized``; with stems: ``fuzzy``)."""

    def __init__(self, fuzzy: bool) -> None:
        self._fuzzy = fuzzy
        self._root = _Node()
        # fuzzy only: stem -> {subject word: its ending for that stem}; word -> reference count
        self._stems: dict[str, dict[str, str]] = {}
        self._word_refs: dict[str, int] = {}

    def _keys(self, text: str) -> list[tuple[str, str, int, int]]:
        """(trie key, normalized token, start, end) per token of ``text``."""
        tokens = _tokens(text)
        if not self._fuzzy:
            return [(tok, tok, start, end) for tok, start, end in tokens]
        keys = []
        for k, (tok, start, end) in enumerate(tokens):
            key = fold_accents(tok)
            if not key:
                continue
            if (
                key in _CLITICS
                and k > 0
                and tokens[k - 1][2] == start - 1
                and text[start - 1] in _APOSTROPHES
            ):
                continue  # a suffix glued to the previous word by an apostrophe
            keys.append((key, tok, start, end))
        return keys

    def add(self, group_id: str, subject: str) -> None:
        keys = self._keys(subject)
        if not keys:
            return
        words = [key[0] for key in keys]
        node = self._root
        for word in words:
            node = node.children.setdefault(word, _Node())
        node.entries[(group_id, subject)] = tuple(key[1] for key in keys)
        if self._fuzzy:
            for word in words:
                self._word_refs[word] = self._word_refs.get(word, 0) + 1
                if self._word_refs[word] == 1:
                    for stem, ending in _analyses(word):
                        self._stems.setdefault(stem, {})[word] = ending

    def remove(self, group_id: str, subject: str) -> None:
        words = [key[0] for key in self._keys(subject)]
        if not words:
            return
        path = [self._root]
        for word in words:
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        if path[-1].entries.pop((group_id, subject), None) is None:
            return
        for depth in range(len(words), 0, -1):  # prune nodes that lead nowhere
            node = path[depth]
            if node.entries or node.children:
                break
            del path[depth - 1].children[words[depth - 1]]
        if self._fuzzy:
            for word in words:
                self._word_refs[word] -= 1
                if self._word_refs[word] == 0:
                    del self._word_refs[word]
                    for stem, _ in _analyses(word):
                        bucket = self._stems[stem]
                        bucket.pop(word, None)
                        if not bucket:
                            del self._stems[stem]

    def _candidates(self, token: str) -> dict[str, tuple[str, str, str]]:
        """Subject words this text token can stand for -> the reading that links them,
        (stem, subject word's ending, token's ending), longest stem first; a word equal to the
        token has the reading (token, '', '')."""
        if not self._fuzzy:
            return {token: (token, "", "")}
        found: dict[str, tuple[str, str, str]] = {}
        for stem, text_ending in _analyses(token):  # longest stem first
            for word, subject_ending in self._stems.get(stem, {}).items():
                if word not in found:
                    found[word] = (stem, subject_ending, text_ending)
        return found

    def search(self, text: str) -> Iterator[_Hit]:
        keys = self._keys(text)
        n = len(keys)
        candidates = [self._candidates(key[0]) for key in keys]
        # Tokens whose spans overlap come from one character that NFKC expanded ("½" -> "1⁄2"):
        # a match may not start or end inside such a character.
        glued = [k > 0 and keys[k - 1][3] > keys[k][2] for k in range(n)] + [False]
        for i in range(n):
            if glued[i]:
                continue
            states = [self._root]
            for j in range(i, n):
                next_states = []
                for node in states:
                    for word, reading in candidates[j].items():
                        child = node.children.get(word)
                        if child is None:
                            continue
                        next_states.append(child)
                        if glued[j + 1]:
                            continue
                        for (group_id, subject), subject_tokens in child.entries.items():
                            if j == i and subject_tokens[0] != keys[i][1]:
                                # a one-word subject, matched only after folding/stemming
                                if not _single_word_ok(*reading):
                                    continue
                            yield keys[i][2], keys[j][3], group_id, subject
                states = next_states
                if not states:
                    break


# --------------------------------------------------------------------------- public matcher


def _resolve(matches: list[Match]) -> list[Match]:
    """Non-overlapping subset: longest first, then earlier start, then smaller group id."""
    chosen: list[Match] = []
    for m in sorted(matches, key=lambda m: (m.start - m.end, m.start, str(m.group_id))):
        if all(m.end <= c.start or c.end <= m.start for c in chosen):
            chosen.append(m)
    return sorted(chosen, key=lambda m: m.start)


class SubjectMatcher:
    """Finds which cached edit group's subject occurs in a query, and where.

    ``subjects`` maps group id -> all subjects of that group (every language).  ``mode`` is one
    of ``MATCHERS``; see the module docstring for each mode's rules.
    """

    def __init__(self, subjects: Mapping[str, Iterable[str]] | None = None, mode: str = "exact"):
        if mode not in MATCHERS:
            raise ValueError(f"unknown matcher {mode!r}; choose one of {', '.join(MATCHERS)}")
        self.mode = mode
        self._index: _ExactIndex | _TokenIndex = (
            _ExactIndex() if mode == "exact" else _TokenIndex(fuzzy=mode == "fuzzy")
        )
        self._groups: dict[str, tuple[str, ...]] = {}
        for group_id, group_subjects in (subjects or {}).items():
            self.add(group_id, group_subjects)

    def add(self, group_id: str, subjects: Iterable[str]) -> None:
        """Register a group; an existing group's subjects are replaced."""
        if isinstance(subjects, str):
            subjects = [subjects]
        unique = tuple(dict.fromkeys(s for s in subjects if s and s.strip()))
        if group_id in self._groups:
            self.remove(group_id)
        self._groups[group_id] = unique
        for subject in unique:
            self._index.add(group_id, subject)

    def remove(self, group_id: str) -> None:
        """Forget a group (KeyError if it is not registered)."""
        for subject in self._groups.pop(group_id):
            self._index.remove(group_id, subject)

    def subjects(self, group_id: str) -> tuple[str, ...]:
        return self._groups[group_id]

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._groups

    def __repr__(self) -> str:
        return f"SubjectMatcher(mode={self.mode!r}, groups={len(self)})"

    def find_all(self, text: str) -> list[Match]:
        """Every (group, span) occurrence, overlaps included, sorted by start then end."""
        seen: dict[tuple[str, int, int], Match] = {}
        for start, end, group_id, subject in self._index.search(text):
            seen.setdefault((group_id, start, end), Match(group_id, subject, start, end))
        return sorted(seen.values(), key=lambda m: (m.start, m.end, str(m.group_id)))

    def find(self, text: str) -> list[Match]:
        """Non-overlapping matches sorted by start; overlaps resolve to the longest match
        (ties: earlier start, then smaller group id)."""
        return _resolve(self.find_all(text))
