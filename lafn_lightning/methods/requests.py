"""Edit requests of the Locate-then-Edit baselines: one (prompt, subject, target) per language.

Usage::

    groups = load_groups(default_dataset(), languages=["en", "zh"], select="0:10")
    by_lang = requests_by_language(groups)       # {"en": [EditRequest, ...], "zh": [...]}

An MzsRE group (one fact in several languages) becomes one request per language (paper Sec. 4.2:
the new value is optimised separately for each language's answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class EditRequest:
    """One language's edit: the question, its subject, the new answer (and the group's subjects)."""

    language: str
    prompt: str
    subject: str
    target: str
    group_id: str = ""
    subjects: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"language": self.language, "prompt": self.prompt, "subject": self.subject,
                "target": self.target, "group_id": self.group_id}


def requests_by_language(groups, languages: Sequence[str] | None = None) -> dict[str, list[EditRequest]]:
    """``{language: [EditRequest, ...]}`` in group order, for ``languages`` (default: all present)."""
    out: dict[str, list[EditRequest]] = {}
    for group in groups:
        for lang in languages or group.languages:
            edit = group.edits.get(lang)
            if edit is None:
                continue
            out.setdefault(lang, []).append(EditRequest(lang, edit.prompt, edit.subject, edit.target,
                                                        group.group_id, tuple(group.subjects)))
    return out
