"""Lexical support of a stage-2 route: how much of a group's subject is spelled in the query.

    lexical_support("Когда возникла инициатива ИААФ по многоборью?", ["Соревнования ИААФ по многоборью"])
    # 0.62: share of the subject's character n-grams (folded) found in the query

Characters are NFKD-folded, marks dropped, case-folded, runs of non-letters/digits become one
space; n = 2 for subjects in scripts without word spaces (CJK, Thai), else 3.  The score is the
best over the group's subjects (every language).
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["fold", "lexical_support"]

_NO_SPACE = ((0x0E00, 0x0EFF), (0x3040, 0x30FF), (0x3400, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF))


def _no_space(text: str) -> bool:
    n = sum(any(lo <= ord(c) <= hi for lo, hi in _NO_SPACE) for c in text)
    return n * 2 >= max(1, sum(not c.isspace() for c in text))


@lru_cache(maxsize=65536)
def fold(text: str) -> str:
    """Case-folded, accent-free text with single spaces between letter/digit runs."""
    out, space = [], True
    for ch in unicodedata.normalize("NFKD", text).casefold():
        cat = unicodedata.category(ch)
        if cat[0] == "M" and not (0x0E00 <= ord(ch) <= 0x0EFF):
            continue
        if cat[0] in "LN" or (0x0E00 <= ord(ch) <= 0x0EFF):
            out.append(ch)
            space = False
        elif not space:
            out.append(" ")
            space = True
    return "".join(out).strip()


@lru_cache(maxsize=65536)
def _grams(text: str, n: int) -> frozenset[str]:
    t = f" {text} " if n > 2 else text
    return frozenset(t[i:i + n] for i in range(max(1, len(t) - n + 1)))


def lexical_support(query: str, subjects: Iterable[str]) -> float:
    """Best share (0..1) of a subject's character n-grams present in ``query``."""
    q = fold(query)
    best = 0.0
    for s in subjects:
        fs = fold(s)
        if not fs:
            continue
        n = 2 if _no_space(fs) else 3
        g = _grams(fs, n)
        best = max(best, len(g & _grams(q, n)) / len(g))
    return best
