"""The groups a config selects, checked before any compute: the one place both the DataModule and
the commands read edit data through.

    groups = select_groups(dataset=None, languages=["en", "zh"], groups="0:4")   # packaged dev records

Besides the readers' own validation: a non-empty language list, one language set for every
group, and subjects an edit can be attached to and matched by (:func:`check_subjects`).
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..text.matching import SubjectMatcher
from ..text.scripts import is_unspaced
from .packaged import default_dataset, read_zsre_train
from .records import DataError, EditGroup, attach_paraphrases, load_groups, normalize_language

__all__ = ["select_groups", "check_subjects", "MIN_SUBJECT_CHARS", "MAX_SUBJECT_FIRE_RATE"]

#: a subject needs at least this many letters/digits (any script): one letter ("a") or one CJK
#: character would match inside a large share of ordinary questions
MIN_SUBJECT_CHARS = 2
#: a subject that the exact matcher finds in more than this share of ordinary questions of its
#: language (the packaged zsRE training questions) would fire on unrelated queries
MAX_SUBJECT_FIRE_RATE = 0.01
_REFERENCE_QUESTIONS = 2000


def select_groups(dataset: str | None = None, format: str = "auto", languages: Sequence[str] | None = None,
                  groups=None, paraphrases: str | None = None, *, check: bool = True) -> list[EditGroup]:
    """Read and check the selected groups (``dataset=None``: the packaged MzsRE dev records).

    ``languages=None`` means every language of the data; an empty list is an error.
    ``check=False`` skips :func:`check_subjects` (an explicit override for unusual subjects).
    """
    dataset = dataset or default_dataset()
    if languages is not None and len(languages) == 0:
        raise DataError("data.languages: empty list; give the languages to edit, or null for all", field="languages")
    langs = [normalize_language(code, where="data.languages") for code in languages] if languages else None
    selected = load_groups(dataset, format=format, languages=langs, select=groups)
    if not selected:
        raise DataError(f"data.groups={groups!r} selects no record of {dataset}", field="groups")
    first = selected[0]
    for g in selected[1:]:
        if set(g.languages) != set(first.languages):
            raise DataError(f"{Path(dataset).name}: record {g.index}, field 'edits': languages {sorted(g.languages)} "
                            f"differ from record {first.index}'s {sorted(first.languages)}; choose data.languages "
                            "present in every selected record", file=Path(dataset).name, index=g.index)
    if paraphrases:
        selected = attach_paraphrases(selected, paraphrases)
    for g in selected:
        prompts = [e.prompt for e in g.edits.values()]
        if not any(s in p for s in g.subjects for p in prompts):
            raise DataError(f"{Path(dataset).name}: record {g.index} ({g.group_id}), field 'subject': no subject of "
                            f"the group ({list(g.subjects)}) occurs in any of its questions", index=g.index)
    if check:
        check_subjects(selected, Path(dataset).name)
    return selected


def _word_chars(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch)[0] in "LNM"]


@lru_cache(maxsize=16)
def _reference(language: str) -> tuple[str, ...]:
    return tuple(q for q, _ in read_zsre_train(language, limit=_REFERENCE_QUESTIONS))


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot be matched sensibly on its own (None when it can)."""
    chars = _word_chars(subject)
    if not chars:
        return "has no letter or digit (only punctuation or invisible characters)"
    if len(chars) < MIN_SUBJECT_CHARS:
        kind = "character" if is_unspaced(chars[0]) else "letter or digit"
        return f"has a single {kind}: it would match inside many unrelated questions"
    return None


def check_subjects(groups: Sequence[EditGroup], source: str = "data") -> None:
    """Refuse subjects that cannot be matched sensibly: no letter or digit, fewer than
    :data:`MIN_SUBJECT_CHARS`, or found by the exact matcher in more than
    :data:`MAX_SUBJECT_FIRE_RATE` of 2,000 ordinary questions of their language."""
    for g in groups:
        for lang, e in g.edits.items():
            problem = subject_problem(e.subject)
            if problem:
                raise DataError(f"{source}: record {g.index}, field '{lang}.subject': subject {e.subject!r} {problem}; "
                                "pass --data.check_subjects false to edit it anyway", index=g.index,
                                field=f"{lang}.subject")
    by_language: dict[str, dict[str, list[tuple[EditGroup, str]]]] = {}
    for g in groups:
        for lang, e in g.edits.items():
            by_language.setdefault(lang, {}).setdefault(e.subject, []).append((g, lang))
    for lang, subjects in by_language.items():
        matcher = SubjectMatcher({s: [s] for s in subjects}, mode="exact")
        questions = _reference(lang)
        hits: dict[str, int] = {}
        for q in questions:
            for s in {m.group_id for m in matcher.find_all(q)}:
                hits[s] = hits.get(s, 0) + 1
        for s, n in hits.items():
            if n / len(questions) > MAX_SUBJECT_FIRE_RATE:
                g, _ = subjects[s][0]
                raise DataError(f"{source}: record {g.index}, field '{lang}.subject': subject {s!r} occurs in "
                                f"{100 * n / len(questions):.1f}% of ordinary {lang} questions (limit "
                                f"{100 * MAX_SUBJECT_FIRE_RATE:.0f}%): the edit would fire on unrelated queries; "
                                "pass --data.check_subjects false to edit it anyway", index=g.index,
                                field=f"{lang}.subject")
