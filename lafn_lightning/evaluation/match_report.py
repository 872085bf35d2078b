"""Subject-matching coverage of a dataset, per matcher and language (``lafn match-report``).

    report, counts = coverage_report(groups, ["exact", "fuzzy"])   # every group registered at once
    print(format_table(counts))

``found``: share of edit/rephrase/portability questions in which the own group is found;
``false_match``: share of locality questions with any match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..data import EditGroup, LanguageEdit
from ..text.matching import MATCHERS, Match, SubjectMatcher

__all__ = ["PROBES", "LanguageCoverage", "group_matcher", "measure", "coverage_report",
           "format_table"]

#: The probe kinds in which the group's own subject should be found.
PROBES = ("prompt", "rephrase", "portability")


def probe_text(edit: LanguageEdit, probe: str) -> str | None:
    """The question of one probe kind (``prompt``, ``rephrase``, ``portability``, ``locality``)."""
    return {"prompt": edit.prompt, "rephrase": edit.rephrase,
            "portability": edit.portability_prompt, "locality": edit.locality_prompt}[probe]


@dataclass
class LanguageCoverage:
    """Counts for one matcher and language.

    ``n[probe]``: questions of that kind; ``found[probe]``: those in which the own group was
    found; ``other[probe]``: those in which some *other* group was found (a wrong ΔV would be
    applied too); ``loc_n`` / ``loc_false``: locality questions, and those with any match.
    ``misses``: ``(group_id, probe, own subject, text)`` of every question without its group;
    ``loc_hits``: ``(matches, text)`` of every locality question with a match.
    """

    n: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBES, 0))
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBES, 0))
    other: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBES, 0))
    loc_n: int = 0
    loc_false: int = 0
    misses: list[tuple[str, str, str, str]] = field(default_factory=list)
    loc_hits: list[tuple[list[Match], str]] = field(default_factory=list)

    @property
    def n_questions(self) -> int:
        return sum(self.n.values())

    @property
    def n_found(self) -> int:
        return sum(self.found.values())

    @property
    def found_share(self) -> float | None:
        return self.n_found / self.n_questions if self.n_questions else None

    @property
    def false_match_share(self) -> float | None:
        return self.loc_false / self.loc_n if self.loc_n else None

    def __iadd__(self, other: "LanguageCoverage") -> "LanguageCoverage":
        for p in PROBES:
            self.n[p] += other.n[p]
            self.found[p] += other.found[p]
            self.other[p] += other.other[p]
        self.loc_n += other.loc_n
        self.loc_false += other.loc_false
        self.misses += other.misses
        self.loc_hits += other.loc_hits
        return self


def group_matcher(groups: Sequence[EditGroup], mode: str) -> SubjectMatcher:
    """One matcher with every group registered under all its languages' subjects."""
    return SubjectMatcher({g.group_id: g.subjects for g in groups}, mode=mode)


def measure(groups: Sequence[EditGroup], mode: str,
            matcher: SubjectMatcher | None = None) -> dict[str, LanguageCoverage]:
    """Per language (in the groups' language order): the coverage counts of matcher ``mode``
    with all ``groups`` registered (or of the given ``matcher``)."""
    matcher = matcher if matcher is not None else group_matcher(groups, mode)
    out: dict[str, LanguageCoverage] = {}
    for g in groups:
        for lang, edit in g.edits.items():
            cov = out.setdefault(lang, LanguageCoverage())
            for probe in PROBES:
                text = probe_text(edit, probe)
                if text is None:
                    continue
                ids = {m.group_id for m in matcher.find(text)}
                cov.n[probe] += 1
                if g.group_id in ids:
                    cov.found[probe] += 1
                else:
                    cov.misses.append((g.group_id, probe, edit.subject, text))
                cov.other[probe] += bool(ids - {g.group_id})
            loc = edit.locality_prompt
            if loc is not None:
                hits = matcher.find(loc)
                cov.loc_n += 1
                if hits:
                    cov.loc_false += 1
                    cov.loc_hits.append((hits, loc))
    return out


def _share(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def coverage_report(groups: Sequence[EditGroup], matchers: Sequence[str] = MATCHERS, built: Mapping | None = None
                    ) -> tuple[dict[str, dict[str, dict[str, float | None]]], dict[str, dict[str, LanguageCoverage]]]:
    """``(report, counts)``: ``report`` is the JSON ``{matcher: {language: {"found", "false_match"}}}``,
    ``counts`` the :class:`LanguageCoverage` behind each cell. ``built``: name -> a matcher object
    already holding every group (e.g. ``{"router": RouterMatcher(...)}``) for names not in MATCHERS."""
    built = built or {}
    counts = {mode: measure(groups, mode, matcher=built.get(mode)) for mode in matchers}
    report = {mode: {lang: {"found": _share(c.found_share), "false_match": _share(c.false_match_share)}
                     for lang, c in per_lang.items()}
              for mode, per_lang in counts.items()}
    return report, counts


def _pct(x: float | None, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{100 * x:{width}.1f}"


def format_table(counts: dict[str, dict[str, LanguageCoverage]]) -> str:
    """Languages as rows; per matcher, found % and false-match % (plus a pooled "all" row)."""
    modes = list(counts)
    langs = list(dict.fromkeys(l for per_lang in counts.values() for l in per_lang))
    width = max(12, *(len(m) + 2 for m in modes)) if modes else 12
    lines = [f"{'':6}" + "".join(f"{m:>{2 * width}}" for m in modes),
             f"{'lang':6}" + "".join(f"{'found %':>{width}}{'false %':>{width}}" for _ in modes)]
    rows = [(l, {m: counts[m].get(l, LanguageCoverage()) for m in modes}) for l in langs]
    total = {}
    for m in modes:
        total[m] = LanguageCoverage()
        for c in counts[m].values():
            total[m] += c
    for name, per_mode in [*rows, ("all", total)]:
        lines.append(f"{name:6}" + "".join(_pct(per_mode[m].found_share, width)
                                           + _pct(per_mode[m].false_match_share, width) for m in modes))
    if modes:
        t = total[modes[0]]
        lines.append(f"({len(langs)} languages; {t.n_questions} edit/rephrase/portability questions and "
                     f"{t.loc_n} locality questions per matcher)")
    return "\n".join(lines)
