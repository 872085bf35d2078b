"""Scripts written without spaces between words: the one table the project uses.

    is_unspaced("巴")   # True: CJK, kana, Thai, Lao, Khmer, Myanmar
    is_unspaced("한")   # False: Korean is written with spaces between words
    joins_without_space("？")  # True: also full-width forms (CJK punctuation)
    is_logographic("한")  # True: one Han, Kana or Hangul character can name something
    mostly_unspaced("กรุงเทพ")  # True: the router compares such text in character bigrams

Answer joining (:mod:`lafn_lightning.editing.prompts`), subject matching
(:mod:`lafn_lightning.text.matching`), subject checks (:mod:`lafn_lightning.data.selection`) and
the router's character n-grams (:mod:`lafn_lightning.routing.lexical`) all read it.
"""
from __future__ import annotations

#: Letter/mark/number blocks of scripts without word spaces.
UNSPACED_RANGES: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3000, 0x30FF),  # CJK symbols and punctuation, Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
#: Scripts in which one character can be a whole word or name: Han (钫, 京), Kana, Hangul syllables.
LOGOGRAPHIC_RANGES: tuple[tuple[int, int], ...] = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
#: Half- and full-width forms (e.g. the full-width question mark ending a Chinese question).
FULLWIDTH_FORMS = (0xFF00, 0xFFEF)


def is_unspaced(char: str) -> bool:
    """True for a character of a script written without spaces between words."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in UNSPACED_RANGES)


def is_logographic(char: str) -> bool:
    """True for a Han, Kana or Hangul character: one of them alone can name something (钫, francium)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in LOGOGRAPHIC_RANGES)


def joins_without_space(char: str) -> bool:
    """True where no space separates this character from its neighbour: :func:`is_unspaced`
    or a half-/full-width form."""
    return is_unspaced(char) or FULLWIDTH_FORMS[0] <= ord(char) <= FULLWIDTH_FORMS[1]


def mostly_unspaced(text: str) -> bool:
    """True when at least half of the non-space characters of ``text`` are :func:`is_unspaced`: the
    router then counts character bigrams, not trigrams (a Han or Thai character carries as much as
    a few letters). Korean is spaced: its folded text (``text.folding.ngram_fold``: Hangul
    syllables split into jamo) is counted in trigrams, about one syllable each."""
    n = sum(is_unspaced(c) for c in text)
    return n * 2 >= max(1, sum(not c.isspace() for c in text))
