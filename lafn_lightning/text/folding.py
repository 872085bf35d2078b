"""Text folding: the rules under which two spellings of a name compare equal.

    fold_case("İSTANBUL")               # 'istanbul'  NFKC + case folding
    fold_accents(fold_case("Łódź"))     # 'lodz'      ... + accents, harakat, points, a letter table
    ngram_fold("Łódź, Ærø!")            # 'łodz ærø'  NFKD + case folding, marks dropped, punctuation -> space

Three rules on purpose, built from one case fold:

=============================  ===================================  ==========================================
rule                           read by                              what it removes
=============================  ===================================  ==========================================
``fold_case``                  ``normalized`` matcher               case, compatibility forms ("ﬁ", "ｶﾞ"),
                               (:mod:`.matching`), per cluster      Turkish "İ" -> "i"; accents stay
``fold_accents(fold_case(.))``  ``fuzzy`` matcher, per token        also Latin/Greek/Cyrillic accents, Arabic
                                                                    harakat, Hebrew points, ø/ł/đ/ı/æ/œ/þ,
                                                                    Thai tone marks; Indic/Thai vowels stay
``ngram_fold``                 router's character n-grams           every combining mark but Thai/Lao ones
                               (:mod:`lafn_lightning.routing.       (also Indic vowel signs, kana voicing
                               lexical`), whole text                marks; Hangul becomes jamo), punctuation;
                                                                    ø and ı stay
=============================  ===================================  ==========================================

The matchers' rules are docs/matching.md; the router's thresholds were calibrated on
:func:`ngram_fold`'s output (docs/router.md), so its rule is not the fuzzy matcher's.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

__all__ = ["fold_case", "fold_accents", "ngram_fold"]


@lru_cache(maxsize=65536)
def fold_case(text: str, form: str = "NFKC") -> str:
    """``text`` in Unicode normal form ``form`` ("NFKC": composed, as the matchers compare it;
    "NFKD": decomposed, so that marks can be dropped one by one), case-folded; Turkish "İ" folds to
    plain "i" (not "i" + combining dot)."""
    folded = unicodedata.normalize(form, text).casefold().replace("i\u0307", "i")
    return unicodedata.normalize(form, folded)


# Combining marks removed by fold_accents: accents of Latin/Greek/Cyrillic, Arabic harakat,
# Hebrew points.  Marks that are letters' vowels (Indic, Thai) are kept.
_DIACRITIC_RANGES = (
    (0x0300, 0x036F),
    (0x0591, 0x05BD),
    (0x05BF, 0x05C7),
    (0x064B, 0x065F),
    (0x0670, 0x0670),
    (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1DFF),
    (0x20D0, 0x20FF),
    (0xFE20, 0xFE2F),
)
_LETTER_FOLD = str.maketrans(
    {"ø": "o", "ł": "l", "đ": "d", "ð": "d", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th",
     "ħ": "h", "ŀ": "l", "ŧ": "t"}
)
_THAI_IGNORED = frozenset("\u0e47\u0e48\u0e49\u0e4a\u0e4b")  # mai taikhu, 4 tone marks
_THAI_SILENT = "\u0e4c"  # thanthakhat: the letter carrying it is not pronounced


def _is_diacritic(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _DIACRITIC_RANGES)


@lru_cache(maxsize=65536)
def fold_accents(token: str) -> str:
    """A :func:`fold_case`'d token without its accents, for the fuzzy matcher ('' means: ignore the
    token). A Thai cluster loses its tone marks and mai taikhu, and is '' where a thanthakhat
    silences it; any other token loses the marks of the diacritic ranges (NFKD, then NFC) and
    folds ø/ł/đ/ð/ı/æ/œ/þ/ħ/ŀ/ŧ to Latin letters."""
    if "\u0e00" <= token[0] <= "\u0e7f":  # Thai cluster
        if _THAI_SILENT in token:
            return ""
        return "".join(ch for ch in token if ch not in _THAI_IGNORED)
    stripped = "".join(
        ch for ch in unicodedata.normalize("NFKD", token) if not _is_diacritic(ch)
    )
    return unicodedata.normalize("NFC", stripped.translate(_LETTER_FOLD))


_KEPT_MARKS = (0x0E00, 0x0EFF)  # Thai, Lao: their vowel signs and tone marks stay part of the spelling


@lru_cache(maxsize=65536)
def ngram_fold(text: str) -> str:
    """``fold_case(text, "NFKD")`` with every combining mark dropped but Thai/Lao ones, and each run
    of other non-letter/digit characters (punctuation, symbols, spaces) turned into one space, ends
    stripped: the text whose character n-grams the router compares."""
    lo, hi = _KEPT_MARKS
    out, space = [], True
    for ch in fold_case(text, "NFKD"):
        kept = lo <= ord(ch) <= hi
        cat = unicodedata.category(ch)
        if cat[0] == "M" and not kept:
            continue
        if cat[0] in "LN" or kept:
            out.append(ch)
            space = False
        elif not space:
            out.append(" ")
            space = True
    return "".join(out).strip()
