"""``lafn match-report``, ``lafn plots``, ``lafn miss-report`` and ``lafn compare``: analysis commands.

    match_report(Settings.from_config("demo", overrides={"data.groups": None}), output="coverage.json")
    plots(Settings.from_config("demo"), output="runs/plots")
    plots(Settings.from_config("demo"), output="docs/figures", results="runs/x/results.json")
    miss_report("runs/r.json", metric="generality", output="runs/r.misses.md")
    compare("runs/preset/results.json", "runs/lever/results.json", metric="generality")
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from ..backbone.ffn import adapter_for
from ..backbone.loading import load_backbone
from ..editing.datamodule import locating_corpus
from ..evaluation import compare as _compare
from ..evaluation.match_report import coverage_report, format_table
from ..evaluation.miss_report import format_markdown, include_for_mode, miss_split
from ..evaluation.protocol import (SETTING_TITLES, SETTINGS, VIEWS, cell_sites, default_setting, progress_file,
                                   read_progress)
from ..evaluation.plots import (_pyplot, difference_matrix, factual_neuron_counts, language_scores, plot_difference_heatmap,
                                plot_language_scores, plot_layer_counts)
from ..files import atomic_write
from ..text.matching import MATCHERS
from .settings import Settings

__all__ = ["match_report", "plots", "miss_report", "compare"]


def match_report(settings: Settings, matchers: list[str] = list(MATCHERS), output: str | None = None) -> dict:
    """How often each group's own subject is found in its edit/rephrase/portability questions, and
    how often locality questions match any group, per matcher and language, with every group that
    ``data.groups`` selects registered at once (``--data.groups null``: the whole dataset).

    Args:
        settings: the parsed config; ``data.*`` selects the groups, ``model.*`` the backbone and
            first edited layer and ``routing.*`` the settings of the router.
        matchers: matchers to compare, among exact, normalized, fuzzy, router (the hidden-state
            router, :mod:`lafn_lightning.routing`: loads the backbone and builds every group's keys).
        output: write the JSON report (``{matcher: {language: {"found", "false_match"}}}``) here.
    """
    unknown = [m for m in matchers if m not in (*MATCHERS, "router")]
    if unknown or not matchers:
        raise ValueError(f"matchers: unknown matcher(s) {unknown}; choose from {', '.join(MATCHERS)}, router")
    groups = settings.load_groups()
    if not groups:
        raise ValueError(f"data.groups={settings.data.get('groups')!r} selects no group")
    built = {"router": _router_matcher(settings, groups)} if "router" in matchers else {}
    report, counts = coverage_report(groups, matchers, built)
    print(f"subject matching coverage: {len(groups)} groups registered, languages {','.join(groups[0].languages)}")
    print(format_table(counts))
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return report


def _router_matcher(settings: Settings, groups):
    """A :class:`RouterMatcher` holding the keys of every group (settings from ``routing.*``)."""
    from ..backbone.fingerprint import fingerprint
    from ..inference.edited_model import RouterMatcher
    from ..routing.build import store_for_groups
    from ..routing.router import Router

    routing = settings.routing
    if routing.threshold is None:
        raise ValueError("matchers router: routing.threshold is not set for this backbone "
                         "(calibrate it as docs/router.md describes, or pass --routing.threshold)")
    hp = SimpleNamespace(**settings.model)
    model, tokenizer = load_backbone(hp.backbone, hp.dtype)
    store = store_for_groups(model, tokenizer, groups, layer=routing.layer,
                             fingerprint=fingerprint(model, list(hp.layers)), routing=routing)
    subjects = {g.group_id: list(g.subjects) for g in groups}
    routing = store.routing
    router = Router(store, subjects, threshold=routing.threshold, lexical_threshold=routing.lexical_threshold,
                    lexical_tiers=routing.lexical_tiers)
    return RouterMatcher(router, model, tokenizer)


def _label(group, width: int = 22) -> str:
    edit = group.edits.get("en") or next(iter(group.edits.values()))
    subject = edit.subject if len(edit.subject) <= width else edit.subject[: width - 1] + "…"
    return f"{group.index}: {subject}"


def plots(settings: Settings, output: str, layer: int | None = None, max_groups: int = 30,
          log_dir: str | None = None, results: str | None = None, setting: str | None = None) -> dict:
    """Figure 1 (factual neurons per layer, per language and their intersection) and Figure 4
    (neuron-set difference between groups in one layer) for the groups ``data.groups`` selects;
    with ``results``, the per-language score bars of an evaluation instead.

    Args:
        settings: the parsed config (``model.*`` the backbone, ``data.*`` the groups, ``locate.beta``
            the threshold).
        output: output directory (two PNG files and neurons.json; with --results, scores_per_language.png).
        layer: layer of the Figure-4 heatmap (default: the first edited layer).
        max_groups: groups in the heatmap (the first N).
        log_dir: also write the figures to TensorBoard here.
        results: a results file of ``lafn evaluate --output``: draw its Reliability, Generality,
            Locality and Portability F1 per language (teacher-forced) and load no backbone.
        setting: with --results, all_cached, edit_one_test_one or pre_edit (default: all_cached where
            the file has it, else edit_one_test_one).
    """
    if results is not None:
        return _score_plot(Path(results), Path(output), setting)
    opt = SimpleNamespace(out=output, layer=layer, max_groups=max_groups, log_dir=log_dir)
    hp = SimpleNamespace(**settings.model)
    model, tokenizer = load_backbone(hp.backbone, hp.dtype)
    adapter = adapter_for(model)
    beta = float(settings.locate["beta"])
    layer = int(hp.layers[0]) if opt.layer is None else opt.layer
    adapter.check_layers([layer], key="--layer")
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = settings.load_groups()
    counts = factual_neuron_counts(model, adapter, tokenizer, [locating_corpus(g) for g in groups], beta=beta,
                                   progress=True)
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    fig1 = plot_layer_counts(counts, out / "factual_neurons_per_layer.png", d_ff=adapter.d_ff,
                             title=f"{name}: factual neurons per layer (beta={beta}, {len(groups)} group(s), "
                                   f"mean per group)")
    shown = groups[: max(opt.max_groups, 1)]
    layer_masks = [m[layer] for m in counts["masks"][: len(shown)]]
    matrix = difference_matrix(layer_masks)
    fig4 = plot_difference_heatmap(matrix, [_label(g) for g in shown], out / f"neuron_difference_layer{layer}.png",
                                   title=f"{name}: neuron-set difference in layer {layer} (beta={beta})")
    summary = {k: v for k, v in counts.items() if k != "masks"}
    summary.update({"beta": beta, "d_ff": adapter.d_ff, "backbone": name, "groups": [g.group_id for g in groups],
                    "heatmap": {"layer": layer, "groups": [g.group_id for g in shown],
                                "located": [int(m.sum()) for m in layer_masks], "difference": matrix.tolist()}})
    atomic_write(out / "neurons.json", json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    if opt.log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(opt.log_dir)
        writer.add_figure("plots/factual_neurons_per_layer", fig1, 0)
        writer.add_figure(f"plots/neuron_difference_layer{layer}", fig4, 0)
        for i, lay in enumerate(counts["layers"]):
            writer.add_scalar("plots/intersection", counts["intersection"][i], lay)
            for lang in counts["languages"]:
                writer.add_scalar(f"plots/neurons_{lang}", counts["per_language"][lang][i], lay)
        writer.close()
    _pyplot().close("all")
    print(f"[lafn] wrote {out / 'factual_neurons_per_layer.png'}, {out / f'neuron_difference_layer{layer}.png'}, "
          f"{out / 'neurons.json'}", file=sys.stderr)
    return summary


def _score_plot(results: Path, out: Path, setting: str | None) -> dict:
    """``lafn plots --results``: the per-language score bars of one results file."""
    try:
        data = json.loads(results.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{results} is not a results file (not valid JSON: {e})") from None
    scores = language_scores(data, setting)
    meta = data.get("meta", {})
    groups = sum(r.get("groups_evaluated", 0) for r in meta.get("runs", {}).values())
    what = meta.get("method", {}).get("name") if meta.get("method") else f"LU-LAFNs, matcher {meta.get('matcher')}"
    title = (f"{what}, backbone {meta.get('backbone', {}).get('name')}, {meta.get('mode')}, {groups} group(s): "
             f"F1 per language ({SETTING_TITLES.get(scores['setting'], scores['setting']).lower()}, teacher-forced)")
    out.mkdir(parents=True, exist_ok=True)
    plot_language_scores(scores, out / "scores_per_language.png", title=title)
    _pyplot().close("all")
    print(f"[lafn] wrote {out / 'scores_per_language.png'}", file=sys.stderr)
    return scores


def miss_report(results: str, metric: str = "generality", setting: str | None = None, view: str = "teacher_forced",
                examples: int = 5, output: str | None = None) -> dict:
    """Split every miss of a metric per language by where the edit fired: not routed, routed to
    another group, routed to another token, routed with no answer.

    Reads the progress file of an evaluation (RESULTS with suffix .progress.jsonl, written by
    ``lafn evaluate --output RESULTS``; a running evaluation's file can be read) and prints the
    tables (markdown). Categories and fields: :mod:`lafn_lightning.evaluation.miss_report`.

    Args:
        results: the results JSON file of ``lafn evaluate`` (only its progress file is read).
        metric: reliability, generality, locality or portability.
        setting: all_cached or edit_one_test_one (default: all_cached where the evaluation has it,
            else edit_one_test_one).
        view: teacher_forced or generation.
        examples: example misses listed per category.
        output: also write the markdown here and the split as JSON beside it (suffix .json; an
            OUTPUT ending in .json: the JSON only).
    """
    _check_cells(metric, setting, view)
    path = progress_file(results)
    header, records = _read_results(results)
    recorded = any(cell_sites(c)[0] is not None for r in records for c in r["cells"] if c[1] != "pre_edit")
    if not recorded:
        if header.get("method"):
            raise ValueError(f"{path}: a comparison method ({header['method'].get('name')}) records no edit sites; "
                             "miss-report splits the misses of LU-LAFN evaluations")
        raise ValueError(f"{path} was written before edit sites were recorded (or holds no scored group); "
                         "rerun lafn evaluate with --restart true")
    split = miss_split(records, metric=metric, setting=setting, view=view, languages=header.get("languages"),
                       include=include_for_mode(header.get("mode")), examples=examples)
    markdown = format_markdown(split)
    print(markdown)
    if split["unrecorded"]["f1"]:
        print(f"[lafn] {split['unrecorded']['f1']} miss(es) in {path} have no recorded sites (older lines): "
              "rerun lafn evaluate with --restart true to split them all", file=sys.stderr)
    if output:
        _write_report(output, split, markdown)
    return split


def _check_cells(metric: str, setting: str | None, view: str) -> None:
    """Refuse a metric, setting or view that no evaluation cell has."""
    from ..evaluation.metrics import METRICS

    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: one of {', '.join(METRICS)}")
    if setting is not None and setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}: one of {', '.join(SETTINGS)}")
    if view not in VIEWS:
        raise ValueError(f"view={view!r}: one of {', '.join(VIEWS)}")


def _read_results(results: str) -> tuple[dict, list[dict]]:
    """``(header, records)`` of the progress file of the results file ``results`` of ``lafn evaluate``."""
    path = progress_file(results)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no progress file of {results} (lafn evaluate --output {results} writes it)")
    return read_progress(path)


def compare(base: str, other: str, metric: str = "generality", setting: str | None = None,
            view: str = "teacher_forced", resamples: int = 10000, seed: int = 0, output: str | None = None) -> dict:
    """Compare two evaluations of the same groups (e.g. a setting against the preset): per language
    the metric's F1 and EM of both, their difference, and a 95 % paired bootstrap interval of the
    averaged difference over the groups both scored.

    Reads the progress files of the results files (``lafn evaluate --output RESULTS`` writes
    RESULTS with suffix .progress.jsonl; a running evaluation's file can be read) and prints a
    markdown table. Only the groups scored in both count (the others are listed); the interval
    resamples whole groups: :mod:`lafn_lightning.evaluation.compare`. A side evaluated in parts
    (e.g. groups 40-47 and 48-55) is given as its results files joined by commas.

    Args:
        base: the results JSON file(s) of the reference evaluation (comma-separated).
        other: the results JSON file(s) of the evaluation compared with it (differences are other - base).
        metric: reliability, generality, locality or portability.
        setting: all_cached or edit_one_test_one (default: all_cached where base has it, else edit_one_test_one).
        view: teacher_forced or generation.
        resamples: bootstrap resamples of the shared groups (0: no interval).
        seed: seed of the resampling.
        output: also write the markdown here and the comparison as JSON beside it (suffix .json;
            an OUTPUT ending in .json: the JSON only).
    """
    _check_cells(metric, setting, view)
    if resamples < 0:
        raise ValueError(f"resamples={resamples}: 0 (no interval) or more")
    (h_base, r_base), (h_other, r_other) = _read_parts(base), _read_parts(other)
    modes = (h_base.get("mode"), h_other.get("mode"))
    if modes[0] != modes[1]:
        raise ValueError(f"{base} is a {modes[0]} evaluation and {other} a {modes[1]} one: compare evaluations of one mode")
    languages = [x for x in h_base.get("languages") or [] if x in (h_other.get("languages") or [])] or None
    result = _compare.compare_runs(r_base, r_other, metric=metric, setting=setting or default_setting(r_base, view, metric),
                                   view=view, languages=languages, include=include_for_mode(modes[0]),
                                   resamples=resamples, seed=seed)
    names = (_run_name(base), _run_name(other))
    markdown = _compare.format_markdown(result, names=names if names[0] != names[1] else ("base", "other"))
    print(markdown)
    if output:
        _write_report(output, result, markdown)
    return result


def _read_parts(results: str) -> tuple[dict, list[dict]]:
    """``(header, records)`` of one evaluation given as comma-separated results files (its parts):
    the first part's header; every part of one mode, no group scored in two parts."""
    header, records, seen = None, [], {}
    for part in [p.strip() for p in results.split(",") if p.strip()]:
        h, recs = _read_results(part)
        if header is not None and h.get("mode") != header.get("mode"):
            raise ValueError(f"{part} is a {h.get('mode')} evaluation and {results.split(',')[0]} a "
                             f"{header.get('mode')} one: the parts of a side must be of one mode")
        header = header or h
        for rec in recs:
            key = (rec["run"], rec["group_id"])
            if key in seen:
                raise ValueError(f"{part} and {seen[key]} both score group {key[1]} ({key[0]}): give each group once per side")
            seen[key] = part
        records += recs
    if header is None:
        raise ValueError(f"{results!r}: no results file")
    return header, records


def _run_name(results: str) -> str:
    """A short name of a results file for a table's columns: its folder's name (runs/x/results.json -> x);
    of comma-separated parts, the first part's name and ``+`` (x+)."""
    path = Path(results.split(",")[0].strip())
    name = (path.parent.name or path.stem) if path.stem == "results" else path.stem
    return name + "+" if "," in results.strip(", ") else name


def _write_report(output: str, data: dict, markdown: str) -> None:
    """Write a report's markdown to ``output`` and its data as JSON beside it (suffix .json; an
    ``output`` ending in .json gets the JSON only)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    atomic_write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    if path != out:
        atomic_write(out, markdown)
    print(f"wrote {', '.join(dict.fromkeys(map(str, (out, path))))}", file=sys.stderr)
