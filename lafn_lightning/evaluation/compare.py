"""Two evaluations of the same groups, side by side: per-language scores, their difference, and a
paired bootstrap over groups of the averaged difference.

    _, base = read_progress(progress_file("runs/preset/results.json"))
    _, other = read_progress(progress_file("runs/lever/results.json"))
    table = compare_runs(base, other, metric="generality", languages=["en", "zh"])
    print(format_markdown(table))

Only the groups (``(run, group_id)`` pairs) scored in both evaluations count, so an evaluation of
groups 40-55 compares with one of 40-47 on 40-47. A language's score is the mean over its cells, and
the average is the macro average over languages, as in ``lafn evaluate``'s results. The interval
resamples whole groups with replacement (each group keeps all its languages), so it shows how much
the averaged difference depends on which groups were edited; with a few groups it is wide.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = ["compare_runs", "format_markdown"]

SCORES: tuple[str, ...] = ("f1", "em")


def _sums(records: Iterable[Mapping[str, Any]], view: str, setting: str, metric: str,
          include: Callable[[str, str], bool]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """``{(run, group_id): {language: [f1 sum, em sum, cells]}}`` of the cells of one view, setting and metric."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rec in records:
        for v, st, m, lang, f1, em, *_ in rec["cells"]:
            if (v, st, m) == (view, setting, metric) and include(rec["run"], lang):
                acc = out.setdefault((rec["run"], rec["group_id"]), {}).setdefault(lang, [0.0, 0.0, 0.0])
                acc[0] += f1
                acc[1] += em
                acc[2] += 1
    return out


def _tensor(sums: Mapping, keys: Sequence, languages: Sequence[str]) -> torch.Tensor:
    """[groups, languages, (f1 sum, em sum, cells)] in ``keys`` order (zeros where a language has no cell)."""
    t = torch.zeros(len(keys), len(languages), 3, dtype=torch.float64)
    for i, key in enumerate(keys):
        for j, lang in enumerate(languages):
            if lang in sums[key]:
                t[i, j] = torch.tensor(sums[key][lang], dtype=torch.float64)
    return t


def _scores(t: torch.Tensor) -> torch.Tensor:
    """Per-language and averaged scores (0-100) from summed cells: [..., languages + 1, 2] (F1, EM);
    NaN where a language has no cell; the average is over the languages that have one."""
    per_lang = 100 * t[..., :2] / t[..., 2:3].clamp(min=1)
    per_lang = torch.where(t[..., 2:3] > 0, per_lang, torch.full_like(per_lang, float("nan")))
    return torch.cat([per_lang, per_lang.nanmean(-2, keepdim=True)], -2)


def compare_runs(
    base: Iterable[Mapping[str, Any]],
    other: Iterable[Mapping[str, Any]],
    metric: str = "generality",
    setting: str = "all_cached",
    view: str = "teacher_forced",
    languages: Sequence[str] | None = None,
    include: Callable[[str, str], bool] = lambda run, lang: True,
    resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Per language and averaged, ``metric``'s F1 and EM of ``base`` and ``other`` over the groups
    both scored, their difference (other - base), and a 95 % paired bootstrap interval of the
    averaged difference.

    Args:
        base, other: progress records ``{"run", "group_id", "cells"}`` (:func:`~.protocol.read_progress`).
        metric, setting, view: the cells compared.
        languages: in order (default: those of ``base``'s cells, in the order they occur).
        include: ``include(run, language)``: the cells to count (``miss_report.include_for_mode``).
        resamples: bootstrap resamples of the groups (0: no interval).
        seed: seed of the resampling.

    Returns:
        ``{"metric", "setting", "view", "languages", "groups", "only_base", "only_other", "base",
        "other", "delta", "interval", "resamples"}``: ``groups`` the number compared, ``only_*``
        the groups one side lacks; ``base``/``other``/``delta`` map each language and ``avg`` to
        ``{"f1", "em"}``; ``interval`` maps ``f1``/``em`` to the 2.5 and 97.5 percentiles of the
        averaged difference (None without resamples or with fewer than 2 groups).

    Raises:
        ValueError: no group is scored in both, or no cell of the metric in the shared groups.
    """
    a = _sums(base, view, setting, metric, include)
    b = _sums(other, view, setting, metric, include)
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError(f"no group has {metric} ({setting}, {view}) cells in both evaluations "
                         f"({len(a)} and {len(b)} groups with such cells)")
    if languages is None:
        languages = list(dict.fromkeys(lang for k in keys for lang in a[k]))
    languages = list(languages)
    ta, tb = _tensor(a, keys, languages), _tensor(b, keys, languages)
    if not (ta[..., 2] > 0).any():
        raise ValueError(f"no {metric} cell in the languages {languages} of the {len(keys)} shared groups")
    sa, sb = _scores(ta.sum(0)), _scores(tb.sum(0))
    names = [*languages, "avg"]

    def table(s: torch.Tensor) -> dict:
        return {n: {score: float(s[i, k]) for k, score in enumerate(SCORES)} for i, n in enumerate(names)}

    interval = None
    if resamples and len(keys) > 1:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(keys), (resamples, len(keys)), generator=gen)
        times = torch.zeros(resamples, len(keys), dtype=ta.dtype).scatter_add_(1, idx, torch.ones_like(idx, dtype=ta.dtype))
        resampled = lambda t: torch.einsum("rg,glk->rlk", times, t)    # noqa: E731  (each group times drawn)
        diff = _scores(resampled(tb))[:, -1] - _scores(resampled(ta))[:, -1]     # [resamples, 2]
        lo, hi = torch.nanquantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype), dim=0)
        interval = {score: [float(lo[k]), float(hi[k])] for k, score in enumerate(SCORES)}
    return {"metric": metric, "setting": setting, "view": view, "languages": languages, "groups": len(keys),
            "only_base": sorted(g for r, g in a if (r, g) not in b), "only_other": sorted(g for r, g in b if (r, g) not in a),
            "base": table(sa), "other": table(sb), "delta": table(sb - sa), "interval": interval,
            "resamples": resamples}


def format_markdown(result: Mapping[str, Any], names: tuple[str, str] = ("base", "other")) -> str:
    """The comparison as one markdown table (a row per language and the average) and the interval."""
    base, other = names
    lines = [f"## {result['metric'].capitalize()}: {other} against {base} ({result['setting']}, {result['view']}, "
             f"{result['groups']} groups)", "",
             f"| Language | {base} F1 | {other} F1 | Δ F1 | {base} EM | {other} EM | Δ EM |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lang in [*result["languages"], "avg"]:
        b, o, d = result["base"][lang], result["other"][lang], result["delta"][lang]
        lines.append(f"| {'Avg' if lang == 'avg' else lang} | {b['f1']:.1f} | {o['f1']:.1f} | {d['f1']:+.1f} | "
                     f"{b['em']:.1f} | {o['em']:.1f} | {d['em']:+.1f} |")
    lines.append("")
    iv = result["interval"]
    if iv:
        lines.append(f"Avg Δ, 95 % paired bootstrap interval over the {result['groups']} groups "
                     f"({result['resamples']} resamples): F1 [{iv['f1'][0]:+.1f}, {iv['f1'][1]:+.1f}], "
                     f"EM [{iv['em'][0]:+.1f}, {iv['em'][1]:+.1f}].")
    for side, key in ((base, "only_base"), (other, "only_other")):
        if result[key]:
            lines.append(f"{len(result[key])} group(s) only in {side}, left out: {', '.join(result[key][:8])}"
                         + (" ..." if len(result[key]) > 8 else "") + ".")
    return "\n".join(lines) + "\n"
