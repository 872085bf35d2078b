"""Where an edit attaches in a question, and the KL anchor "{subject} is a": pure text rules.

    start, end, rule = subject_span(question, own_subject, group.subjects)   # own/other/fuzzy/fallback
    anchor_text("zh", "巴黎")                                                 # "巴黎是一个"

Training (:mod:`lafn_lightning.editing.prompts`) and routing read them, so both agree.
"""
from __future__ import annotations

import unicodedata

from .matching import SubjectMatcher

#: "{subject} is a" in each MzsRE language (the KL anchor q_l of the paper's L_kl).
ANCHOR_TEMPLATES = {
    "en": "{} is a", "cz": "{} je", "de": "{} ist ein", "du": "{} is een", "es": "{} es un",
    "fr": "{} est un", "pt": "{} é um", "ru": "{} — это", "th": "{} เป็น", "tr": "{} bir",
    "vi": "{} là một", "zh": "{}是一个",
}
#: Subject-position rules, in the order they are tried (see :func:`subject_span`).
RULES = ("own", "other", "fuzzy", "fallback")


def subject_span(question: str, own_subject: str, group_subjects) -> tuple[int, int, str]:
    """Where the edit attaches inside ``question``: ``(start, end, rule)`` as character offsets.

    1. ``own``: the first occurrence of the language's own subject;
    2. ``other``: else the longest subject of the group (any language) that occurs;
    3. ``fuzzy``: else the longest match of the ``fuzzy`` subject matcher (inflected forms such
       as Russian "Лолы Бет" for "Лола Бет", stripped accents), which inference can use too;
    4. ``fallback``: else the end of the question (its last non-space, non-punctuation
       character), the "last token" site of ROME-style editing. Its frequency is logged: on such
       prompts no matcher finds the subject, so the edit cannot fire there.
    """
    pos = question.find(own_subject) if own_subject else -1
    if pos >= 0:
        return pos, pos + len(own_subject), "own"
    for subject in sorted(group_subjects, key=len, reverse=True):
        pos = question.find(subject) if subject else -1
        if pos >= 0:
            return pos, pos + len(subject), "other"
    found = SubjectMatcher({"group": list(group_subjects)}, mode="fuzzy").find(question)
    if found:
        best = max(found, key=lambda m: (m.end - m.start, -m.start))
        return best.start, best.end, "fuzzy"
    end = len(question.rstrip())
    while end > 1 and unicodedata.category(question[end - 1]).startswith(("P", "Z")):
        end -= 1
    return end - 1, end, "fallback"


def anchor_text(language: str, subject: str) -> str:
    try:
        return ANCHOR_TEMPLATES[language].format(subject)
    except KeyError:
        return ANCHOR_TEMPLATES["en"].format(subject)
