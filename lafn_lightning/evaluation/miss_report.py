"""Where each miss comes from: the misses of one metric per language, split by where the edit fired.

    header, records = read_progress(progress_file("runs/r.json"))
    split = miss_split(records, metric="generality", languages=header["languages"])
    print(format_markdown(split))

A miss is a question whose edited prediction is not the answer: F1 < 1 (not an exact
teacher-forced hit), and separately EM < 1. Each miss falls in one category, from the cell's
recorded sites (``[token position, group id]`` where ΔV was injected) and the token where the
group's own subject ends in the question (:func:`lafn_lightning.evaluation.protocol.subject_end`):

- ``not_routed``: no edit fired in the question at all;
- ``other_group``: only other groups' edits fired, not the question's own;
- ``other_token``: the own edit fired, but not at the subject's last token (where that is known);
- ``routed_no_answer``: the own edit fired at the subject's last token (or that token is unknown:
  the exact subject form is not in the question) and the answer is still wrong.

Across the categories, ``first_token`` counts the misses whose first predicted answer token is
already wrong (progress files written before cells recorded it count none there).

Cells written before sites were recorded, and those of a model that cannot tell its sites (a
comparison method), are counted as ``unrecorded`` and left out of the split.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from .protocol import VIEW_TITLES, cell_extra, cell_sites, default_setting

__all__ = ["CATEGORIES", "classify", "miss_split", "format_markdown", "include_for_mode"]

CATEGORIES: tuple[str, ...] = ("not_routed", "other_group", "other_token", "routed_no_answer")
CATEGORY_TITLES = {"not_routed": "not routed", "other_group": "other group", "other_token": "other token",
                   "routed_no_answer": "routed, no answer"}
SCORES: tuple[str, ...] = ("f1", "em")


def classify(group_id: str, sites: Sequence[Sequence], subject_end: int | None) -> str:
    """The category of a miss of group ``group_id``'s question, from the ``[position, group id]``
    sites where ΔV was injected and the token where the group's subject ends (None: unknown)."""
    if not sites:
        return "not_routed"
    own = [int(p) for p, g in sites if g == group_id]
    if not own:
        return "other_group"
    if subject_end is not None and subject_end not in own:
        return "other_token"
    return "routed_no_answer"


def include_for_mode(mode: str | None) -> Callable[[str, str], bool]:
    """The cells an evaluation of ``mode`` scores: monolingual, the run's own language;
    cross-lingual, every language but the run's; multilingual, all."""
    if mode == "monolingual":
        return lambda run, lang: run == lang
    if mode == "cross-lingual":
        return lambda run, lang: run != lang
    return lambda run, lang: True


def miss_split(
    records: Iterable[Mapping[str, Any]],
    metric: str = "generality",
    setting: str | None = None,
    view: str = "teacher_forced",
    languages: Sequence[str] | None = None,
    include: Callable[[str, str], bool] = lambda run, lang: True,
    examples: int = 5,
) -> dict:
    """Split every miss of ``metric`` per language into :data:`CATEGORIES`.

    Args:
        records: progress records ``{"run", "group_id", "cells"}`` (:func:`~.protocol.read_progress`).
        metric: reliability, generality, locality or portability.
        setting: all_cached or edit_one_test_one (default: all_cached where the records have it,
            else edit_one_test_one).
        view: teacher_forced or generation.
        languages: the languages, in order (default: in the order they occur); others are ignored.
        include: ``include(run, language)``: the cells to count (:func:`include_for_mode`).
        examples: misses listed per category (by F1).

    Returns:
        ``{"metric", "setting", "view", "languages", "f1": table, "em": table, "unrecorded",
        "examples"}``. A table maps each language and ``avg`` to ``{"questions", "misses",
        "counts": {category: n}, "shares": {category: fraction of the misses}, "first_token": n}``
        (``first_token``: the misses whose first answer token is wrong); ``avg`` sums the
        questions, misses and counts over the languages and macro-averages the shares over the
        languages with a miss. ``unrecorded``: ``{"f1", "em"}`` misses whose cell has no sites.
        ``examples``: ``{"group_id", "run", "language", "category", "prediction", "f1", "em",
        "sites", "subject_end"}`` of up to ``examples`` F1 misses per category.
    """
    records = list(records)
    setting = setting or default_setting(records, view, metric)
    order = list(languages) if languages is not None else []
    counts: dict[str, dict[str, dict]] = {s: {} for s in SCORES}
    unrecorded = {s: 0 for s in SCORES}
    shown: list[dict] = []
    for rec in records:
        for cell in rec["cells"]:
            v, st, m, lang, f1, em = cell[:6]
            if (v, st, m) != (view, setting, metric) or not include(rec["run"], lang):
                continue
            if languages is not None and lang not in languages:
                continue
            if lang not in order:
                order.append(lang)
            sites, end = cell_sites(cell)
            first_wrong = cell_extra(cell).get("first_token") is False
            category = classify(rec["group_id"], sites, end) if sites is not None else None
            for score, value in (("f1", f1), ("em", em)):
                row = counts[score].setdefault(lang, {"questions": 0, "misses": 0, "first_token": 0,
                                                      "counts": dict.fromkeys(CATEGORIES, 0)})
                row["questions"] += 1
                if value >= 1.0:
                    continue
                if category is None:
                    unrecorded[score] += 1
                    continue
                row["misses"] += 1
                row["counts"][category] += 1
                row["first_token"] += first_wrong
            if f1 < 1.0 and category is not None and sum(e["category"] == category for e in shown) < examples:
                shown.append({"group_id": rec["group_id"], "run": rec["run"], "language": lang, "category": category,
                              "prediction": cell[6], "f1": f1, "em": em, "sites": sites, "subject_end": end})
    out: dict[str, Any] = {"metric": metric, "setting": setting, "view": view,
                           "languages": [x for x in order if x in counts["f1"]]}
    for score in SCORES:
        table = {}
        for lang in out["languages"]:
            row = counts[score][lang]
            row["shares"] = {c: row["counts"][c] / row["misses"] if row["misses"] else None for c in CATEGORIES}
            table[lang] = row
        rows = list(table.values())
        missed = [r for r in rows if r["misses"]]
        table["avg"] = {
            "questions": sum(r["questions"] for r in rows),
            "misses": sum(r["misses"] for r in rows),
            "first_token": sum(r["first_token"] for r in rows),
            "counts": {c: sum(r["counts"][c] for r in rows) for c in CATEGORIES},
            "shares": {c: sum(r["shares"][c] for r in missed) / len(missed) if missed else None for c in CATEGORIES},
        }
        out[score] = table
    out["unrecorded"] = unrecorded
    out["examples"] = shown
    return out


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def format_markdown(split: Mapping[str, Any]) -> str:
    """The split as markdown: one table per score (F1 < 100, EM < 100), then the example misses."""
    title = f"{split['metric'].capitalize()} misses ({split['setting']}, {VIEW_TITLES.get(split['view'], split['view'])})"
    lines = [f"## {title}", "",
             "Per language: questions, misses, and each category's count (share of the misses). "
             "Avg: counts summed, shares macro-averaged over the languages with a miss. "
             "First token wrong: the misses (any category) whose first answer token is already wrong.", ""]
    for score, label in (("f1", "F1 < 100 (not an exact hit)"), ("em", "EM < 100")):
        lines += [f"### Misses by {label}", "",
                  "| Language | Questions | Misses | " + " | ".join(CATEGORY_TITLES[c] for c in CATEGORIES)
                  + " | first token wrong |",
                  "|" + "|".join([" --- "] + [" ---: "] * (3 + len(CATEGORIES))) + "|"]
        for lang, row in split[score].items():
            cells = [f"{row['counts'][c]} ({row['shares'][c] * 100:.0f}%)" if row["shares"][c] is not None
                     else f"{row['counts'][c]}" for c in CATEGORIES]
            name = "Avg" if lang == "avg" else lang
            lines.append(f"| {name} | {row['questions']} | {row['misses']} | " + " | ".join(cells)
                         + f" | {row['first_token']} |")
        if split["unrecorded"][score]:
            lines.append(f"\n{split['unrecorded'][score]} miss(es) have no recorded sites (progress lines written "
                         "before sites were recorded, or a comparison method) and are not split.")
        lines.append("")
    lines += ["### Example misses (F1 < 100)", ""]
    if not split["examples"]:
        lines.append("None.")
    else:
        lines += ["| Group | Language | Category | Prediction | F1 | Sites [token, group] | Subject ends at |",
                  "| --- | --- | --- | --- | ---: | --- | ---: |"]
        for e in sorted(split["examples"], key=lambda e: CATEGORIES.index(e["category"])):
            sites = ", ".join(f"[{p}, {g}]" for p, g in e["sites"]) or "none"
            end = "-" if e["subject_end"] is None else e["subject_end"]
            lines.append(f"| {_escape(e['group_id'])} | {e['language']} | {CATEGORY_TITLES[e['category']]} | "
                         f"{_escape(e['prediction'])} | {e['f1'] * 100:.1f} | {_escape(sites)} | {end} |")
    return "\n".join(lines) + "\n"
