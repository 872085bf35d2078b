"""The groups a config selects, checked before any compute: the one place both the DataModule and
the commands read edit data through.

    groups = select_groups(dataset=None, languages=["en", "zh"], groups="0:4")   # packaged dev records

Besides the readers' own validation: a non-empty language list, one language set for every
group, and subjects an edit can be attached to and matched by (:func:`check_subjects`).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..text.matching import SubjectMatcher
from ..text.scripts import is_unspaced, is_logographic
from .packaged import default_dataset, read_zsre_train
from .records import DataError, EditGroup, attach_paraphrases, load_groups, normalize_language

__all__ = ["Selection", "select", "select_groups", "check_subjects", "subject_problem", "MIN_SUBJECT_CHARS",
           "MAX_SUBJECT_FIRE_RATE"]

#: a subject needs at least this many letters/digits: one letter ("a") would match inside a large
#: share of ordinary questions. One Han, Kana or Hangul character can be a whole name (钫, francium),
#: so it passes this rule; the fire-rate rule below still refuses a common one.
MIN_SUBJECT_CHARS = 2
#: a subject that the exact matcher finds in more than this share of ordinary questions of its
#: language (the packaged zsRE training questions) would fire on unrelated queries
MAX_SUBJECT_FIRE_RATE = 0.01
_REFERENCE_QUESTIONS = 2000


@dataclass
class Selection:
    """The groups a config selects that can be edited, and the records left out with the reason.

        sel = select(languages=["en", "zh"], groups=None)      # every record, bad ones skipped
        sel.groups, sel.skipped                                 # [EditGroup...], {"mzsre:17": "..."}
    """

    groups: list[EditGroup]
    skipped: dict[str, str] = field(default_factory=dict)   # group id -> one line: file, record, field, why


def select(dataset: str | None = None, format: str = "auto", languages: Sequence[str] | None = None,
           groups=None, paraphrases: str | None = None, *, check: bool = True, strict: bool = False) -> Selection:
    """Read and check the selected groups (``dataset=None``: the packaged MzsRE dev records).

    A record whose subjects cannot be attached or matched (none occurs in its questions, or
    :func:`check_subjects` refuses one) is left out and listed in ``skipped`` with its reason, so
    one record never stops a whole-dataset run; ``strict=True`` raises the first such problem
    instead. Problems of the file or the selection itself always raise. ``languages=None`` means
    every language of the data; an empty list is an error. ``check=False`` skips
    :func:`check_subjects` (an explicit override for unusual subjects).
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
    problems: dict[str, DataError] = {}
    for g in selected:
        prompts = [e.prompt for e in g.edits.values()]
        if not any(s in p for s in g.subjects for p in prompts):
            problems[g.group_id] = DataError(
                f"{Path(dataset).name}: record {g.index} ({g.group_id}), field 'subject': no subject of the group "
                f"({list(g.subjects)}) occurs in any of its questions", index=g.index, field="subject")
    if check:
        for gid, error in subject_problems(selected, Path(dataset).name).items():
            problems.setdefault(gid, error)
    if problems and strict:
        raise next(problems[g.group_id] for g in selected if g.group_id in problems)   # the first in selection order
    kept = [g for g in selected if g.group_id not in problems]
    skipped = {g.group_id: str(problems[g.group_id]) for g in selected if g.group_id in problems}
    if not kept:
        raise DataError(f"every selected record was skipped ({len(skipped)}); the first: {next(iter(skipped.values()))}",
                        field="groups")
    return Selection(kept, skipped)


def select_groups(dataset: str | None = None, format: str = "auto", languages: Sequence[str] | None = None,
                  groups=None, paraphrases: str | None = None, *, check: bool = True,
                  strict: bool = True) -> list[EditGroup]:
    """The groups of :func:`select`; ``strict=True`` (here the default): refuse any problem record."""
    return select(dataset, format, languages, groups, paraphrases, check=check, strict=strict).groups


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
    if len(chars) < MIN_SUBJECT_CHARS and not is_logographic(chars[0]):
        kind = "character" if is_unspaced(chars[0]) else "letter or digit"
        return f"has a single {kind}: it would match inside many unrelated questions"
    return None


def subject_problems(groups: Sequence[EditGroup], source: str = "data") -> dict[str, DataError]:
    """Per group id, the first reason its subjects cannot be matched sensibly: no letter or digit,
    fewer than :data:`MIN_SUBJECT_CHARS` (one Han, Kana or Hangul character is a name), or found
    by the exact matcher in more than :data:`MAX_SUBJECT_FIRE_RATE` of 2,000 ordinary questions of
    their language (the packaged zsRE training questions)."""
    hint = "pass --data.check_subjects false to edit it anyway"
    problems: dict[str, DataError] = {}
    for g in groups:
        for lang, e in g.edits.items():
            problem = subject_problem(e.subject)
            if problem and g.group_id not in problems:
                problems[g.group_id] = DataError(f"{source}: record {g.index}, field '{lang}.subject': subject "
                                                 f"{e.subject!r} {problem}; {hint}", index=g.index,
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
                for g, _ in subjects[s]:
                    problems.setdefault(g.group_id, DataError(
                        f"{source}: record {g.index}, field '{lang}.subject': subject {s!r} occurs in "
                        f"{100 * n / len(questions):.1f}% of ordinary {lang} questions (limit "
                        f"{100 * MAX_SUBJECT_FIRE_RATE:.0f}%): the edit would fire on unrelated queries; {hint}",
                        index=g.index, field=f"{lang}.subject"))
    return problems


def check_subjects(groups: Sequence[EditGroup], source: str = "data") -> None:
    """Raise the first problem :func:`subject_problems` finds (in group order)."""
    problems = subject_problems(groups, source)
    for g in groups:
        if g.group_id in problems:
            raise problems[g.group_id]
