"""The evaluation protocol: probes of a group, their scores under every setting, aggregation, resume log.

    cells = score_group(model, tokenizer, group, {"edit_one_test_one": edited_one, "all_cached": edited_all})
    tables = aggregate(records, languages=["en", "zh"])
    header, records = read_progress(progress_file("runs/r.json"))   # runs/r.progress.jsonl

Settings (edit_one_test_one, all_cached, pre_edit), views (teacher-forced, generation) and the
file formats: docs/evaluation-protocol.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import metrics as M
from ..files import append_line, atomic_write, complete_lines
from ..data import EditGroup
from ..text.matching import SubjectMatcher
from ..text.spans import last_token_of_span, token_spans

__all__ = [
    "MODES",
    "SETTINGS",
    "VIEWS",
    "Probe",
    "group_probes",
    "score_group",
    "subject_end",
    "aggregate",
    "ProgressLog",
    "progress_file",
    "read_progress",
    "default_setting",
]

SETTINGS: tuple[str, ...] = ("edit_one_test_one", "all_cached", "pre_edit")
VIEWS: tuple[str, ...] = ("teacher_forced", "generation")
MODES: tuple[str, ...] = ("multilingual", "monolingual", "cross-lingual")
_MODE_ALIASES = {"multi": "multilingual", "mono": "monolingual", "cross": "cross-lingual",
                 "crosslingual": "cross-lingual", "cross_lingual": "cross-lingual"}
SETTING_TITLES = {"edit_one_test_one": "Edit one, test one", "all_cached": "All edits cached",
                  "pre_edit": "Pre-edit (unedited backbone)"}
VIEW_TITLES = {"teacher_forced": "teacher-forced (paper protocol)", "generation": "free generation (greedy)"}
PROGRESS_VERSION = 1


# --------------------------------------------------------------------------------------------
# Probes and per-group scores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One evaluation question: the metric it feeds, its language, the question and the answer."""

    metric: str
    language: str
    prompt: str
    target: str


def group_probes(group: EditGroup, languages: Sequence[str] | None = None) -> list[Probe]:
    """The probes of ``group`` in ``languages`` (default: all of the group's), metric-major per
    language. Probes missing from the data are left out."""
    out = []
    for lang in languages or group.languages:
        e = group.edits.get(lang)
        if e is None:
            continue
        pairs = (
            ("reliability", e.prompt, e.target),
            ("generality", e.rephrase, e.target),
            ("locality", e.locality_prompt, e.locality_answer),
            ("portability", e.portability_prompt, e.portability_answer),
        )
        out += [Probe(m, lang, q, a) for m, q, a in pairs if q is not None and a is not None]
    return out


class _KeepLogits(nn.Module):
    """A model whose forward names ``logits_to_keep``, so ``metrics.teacher_forced_predictions``
    projects only the answer positions onto the vocabulary (Gemma 3: 262k entries) for the edited
    model as it does for the backbone. ``inner`` is an :class:`EditedModel` or the backbone; both
    are called the same way, so unmatched rows give bit-identical logits."""

    def __init__(self, inner: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        params = M._forward_params(backbone)
        self._extra = {"use_cache": False} if "use_cache" in params else {}
        self._keep = "logits_to_keep" in params

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        extra = dict(self._extra)
        if self._keep:  # else the backbone returns every position and the metrics take what they need
            extra["logits_to_keep"] = logits_to_keep
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra)


def _greedy_generate(target, tokenizer, model) -> Callable[..., torch.Tensor]:
    """``generate(input_ids=, attention_mask=, max_new_tokens=)`` of ``target`` (backbone or
    EditedModel), greedy whatever the model's own generation config says."""
    from transformers import GenerationConfig

    eos = sorted(M._eos_ids(tokenizer, model))
    config = GenerationConfig(do_sample=False, num_beams=1, pad_token_id=M._pad_id(tokenizer),
                              eos_token_id=eos or None)

    def run(input_ids, attention_mask, max_new_tokens):
        config.max_new_tokens = max_new_tokens
        return target.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)

    return run


def _score(tokenizer, pred: Sequence[int], ref: Sequence[int], locality: bool) -> tuple[float, float]:
    if locality:
        return M.locality_scores(pred, ref, tokenizer)
    f1s, ems = M.score_predictions(tokenizer, [pred], [ref])
    return f1s[0], ems[0]


def _site_signature(edited: nn.Module, rows: Sequence[Sequence[int]]) -> tuple | None:
    """Where ``edited`` injects ΔV in each row (token position, group id), or None when the model
    cannot tell (not an EditedModel)."""
    find = getattr(edited, "find_sites", None)
    if find is None:
        return None
    sig = []
    for ids in rows:
        t = torch.tensor([list(ids)], dtype=torch.long, device=edited.device)
        sig.append(tuple((s.position, s.group_id) for s in find(t, torch.ones_like(t))))
    return tuple(sig)


def subject_end(tokenizer, ids: Sequence[int], subject: str | None,
                special: frozenset[int] | None = None) -> int | None:
    """The token index in ``ids`` where ``subject`` ends, or None when that exact form is not in
    their text.

    The exact matcher (:class:`~lafn_lightning.text.matching.SubjectMatcher`, mode ``exact``) is
    run on the decoded text of ``ids``, and its first occurrence is mapped to its last token with
    the same token spans and last-token rule as :meth:`EditedModel.find_sites`, so an exact-matched
    edit of ``subject`` fires at exactly this index. ``special``: the tokenizer's special ids
    (computed when not given).
    """
    if not subject or not subject.strip():
        return None
    text, spans = token_spans(tokenizer, list(ids), special)
    for m in SubjectMatcher({"subject": [subject]}, "exact").find(text):
        tok = last_token_of_span(spans, m.start, m.end)
        if tok is not None:
            return tok
    return None


def cell_sites(cell: Sequence) -> tuple[list | None, int | None]:
    """``(sites, subject_end)`` of a cell: the ``[position, group id]`` pairs where ΔV was injected
    (None when not recorded: a cell written before sites were recorded, or a model without
    ``find_sites``) and the token where the group's own subject ends in the question (None: the
    exact form does not occur, or not recorded)."""
    extra = cell_extra(cell)
    return extra.get("sites"), extra.get("subject_end")


def default_setting(records: Iterable[Mapping[str, Any]], view: str, metric: str) -> str:
    """The setting a report over ``records`` reads by default: ``all_cached`` where the records have
    cells of ``view`` and ``metric`` in it, else ``edit_one_test_one``."""
    seen = {c[1] for r in records for c in r["cells"] if c[0] == view and c[2] == metric}
    return "all_cached" if "all_cached" in seen else "edit_one_test_one"


def cell_extra(cell: Sequence) -> Mapping:
    """A cell's eighth element (``{"sites", "subject_end", "first_token"}``), ``{}`` where it has none."""
    return cell[7] if len(cell) > 7 and isinstance(cell[7], Mapping) else {}


def score_group(
    model: nn.Module,
    tokenizer,
    group: EditGroup,
    edited: Mapping[str, nn.Module],
    *,
    languages: Sequence[str] | None = None,
    generation: bool = True,
    margin: int = 0,
    batch_size: int = 16,
    reuse: bool = True,
) -> list[list]:
    """Score one group's probes under every setting.

    Args:
        model: the unedited backbone.
        edited: setting name -> :class:`EditedModel` (e.g. ``{"edit_one_test_one": ...,
            "all_cached": ...}``) or a comparison method's edited model (:mod:`lafn_lightning.methods.base`;
            one with ``rewrite_prompts`` is run on the rewritten prompts); ``pre_edit`` is always added.
        languages: test languages (default: the group's).
        reuse: when an edited model injects ΔV at exactly the same (row, token, group) sites as
            one already run (or nowhere at all: the backbone), reuse those predictions instead of
            running it: the computation would be identical, bit for bit. The edited models must
            share one cache. In ``all_cached`` this skips every group whose probes mention no
            other cached subject.

    Returns:
        cells ``[view, setting, metric, language, f1, em, prediction, {"sites", "subject_end", "first_token"}]``
        with f1/em in [0, 1] and the decoded prediction. ``sites``: the ``[token position, group
        id]`` pairs where the setting's model injected ΔV in the probe's row (the whole row in the
        teacher-forced view, the prompt in generation; ``[]`` for ``pre_edit``; None for a model
        without ``find_sites``). ``subject_end``: the token position where the group's own subject
        (its edit's subject in the probe's language) ends in the question, if that exact form
        occurs there (:func:`subject_end`), else None. ``first_token`` (not in locality cells):
        whether the prediction's first answer token is the answer's. Locality is scored against the backbone's
        prediction, computed on the same batch; its ``pre_edit`` cell is not produced.
        Read a cell's sites with :func:`cell_sites` (cells written before sites were recorded
        have 7 elements).
    """
    probes = group_probes(group, languages)
    if not probes:
        return []
    prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
    cells: list[list] = []

    def add(view: str, setting: str, preds, refs, sig: tuple | None) -> None:
        for i, (probe, (pred, gold), (ref, _)) in enumerate(zip(probes, preds, refs)):
            loc = probe.metric == "locality"
            if setting == "pre_edit" and loc:
                continue
            f1, em = _score(tokenizer, pred, ref if loc else gold, loc)
            text = tokenizer.decode(pred, skip_special_tokens=True)
            sites = None if sig is None else [[int(p), g] for p, g in sig[i]]
            extra = {"sites": sites, "subject_end": ends[i]}
            if not loc:
                extra["first_token"] = list(pred[:1]) == list(gold[:1])
            cells.append([view, setting, probe.metric, probe.language, f1, em, text, extra])

    def _prompts(target) -> list[str]:  # a method that edits the context (methods.base.InContext)
        rewrite = getattr(target, "rewrite_prompts", None)
        return list(rewrite(prompts)) if rewrite is not None else prompts

    encoded = M.encode_prompt_targets(tokenizer, prompts, targets)
    special = frozenset(tokenizer.all_special_ids)
    own = {lang: e.subject for lang, e in group.edits.items()}
    ends = [subject_end(tokenizer, e.input_ids[: e.context_length], own.get(p.language), special)
            for e, p in zip(encoded, probes)]
    views = [("teacher_forced", [e.input_ids for e in encoded])]
    if generation:  # generation injects ΔV into the prompt (the context) only
        views.append(("generation", [e.input_ids[: e.context_length] for e in encoded]))
    for view, rows in views:
        if view == "teacher_forced":
            def run(target):
                return M.teacher_forced_predictions(_KeepLogits(target, model), tokenizer, _prompts(target), targets,
                                                    batch_size=batch_size)
        else:
            def run(target):
                return M.greedy_predictions(model, tokenizer, _prompts(target), targets, margin=margin,
                                            batch_size=batch_size, generate=_greedy_generate(target, tokenizer, model))
        base = run(model)
        add(view, "pre_edit", base, base, ((),) * len(probes))
        done: dict[tuple, list] = {}
        for setting, em in edited.items():
            sig = _site_signature(em, rows)       # recorded in the cells; reused only with ``reuse``
            if reuse and sig is not None and not any(sig):
                preds = base                      # no site anywhere: the untouched backbone
            elif reuse and sig is not None and sig in done:
                preds = done[sig]                 # the same sites as a setting already run
            else:
                preds = run(em)
                if sig is not None:
                    done[sig] = preds
            add(view, setting, preds, base, sig)
    return cells


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def aggregate(
    records: Iterable[Mapping[str, Any]],
    languages: Sequence[str],
    include: Callable[[str, str], bool] = lambda run, lang: True,
) -> dict[str, dict]:
    """``{view: {setting: {metric: {language|"avg": {"f1", "em"}}}}}`` (0-100, NaN if no sample)
    from progress records (``{"run", "group_id", "cells"}``), keeping the cells for which
    ``include(run, language)`` holds. Records are added in the order given. Cells with or without
    the sites element (8 or 7 elements) are read alike."""
    tables = {view: M.ScoreTable(languages, settings=SETTINGS) for view in VIEWS}
    for rec in records:
        for view, setting, metric, lang, f1, em, *_ in rec["cells"]:
            if lang in languages and include(rec["run"], lang):
                tables[view].update(metric, lang, [f1], [em], setting=setting)
    return {view: table.compute_all() for view, table in tables.items()}


def _json_numbers(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: _json_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_numbers(v) for v in obj]
    return obj


def _scored(block: Mapping[str, dict]) -> dict:
    """The settings of ``block`` that have at least one sample (a comparison method has no all_cached)."""
    return {setting: table for setting, table in block.items()
            if any(not math.isnan(cell["f1"]) for row in table.values() for cell in row.values())}


def _section(agg: Mapping[str, dict], generation: bool) -> dict:
    out = _scored(agg["teacher_forced"])
    if generation:
        out["generation"] = _scored(agg["generation"])
    return out


def _markdown(title: str, section: Mapping[str, Any], languages: Sequence[str], generation: bool) -> str:
    table = M.ScoreTable(languages)
    parts = [f"## {title}", ""]
    views = [("teacher_forced", section)] + ([("generation", section["generation"])] if generation else [])
    for view, block in views:
        for setting in [x for x in SETTINGS if x in block]:
            parts.append(table.to_markdown(f"{SETTING_TITLES[setting]}, {VIEW_TITLES[view]}", results=block[setting]))
    return "\n".join(parts)


def _matrix_markdown(by_edit: Mapping[str, Mapping], languages: Sequence[str], setting: str, view: str) -> str:
    lines = [f"### Cross-lingual matrix: {SETTING_TITLES[setting]}, {VIEW_TITLES[view]}", "",
             "Rows: edit language; columns: test language; cells F1 / EM.", ""]
    for metric in M.METRICS:
        lines += [f"**{M.METRIC_TITLES[metric]}**", "", "| edit \\ test | " + " | ".join(languages) + " | Avg |",
                  "|" + "|".join([" --- "] + [" :---: "] * (len(languages) + 1)) + "|"]
        for x, block in by_edit.items():
            row = (block if view == "teacher_forced" else block["generation"])[setting][metric]
            cells = [M._format_cell(row[lang], 1) for lang in [*languages, "avg"]]
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Progress file (resume)
# --------------------------------------------------------------------------------------------


def progress_file(output: str | Path) -> Path:
    """The progress file of the results file ``output``: ``runs/r.json`` -> ``runs/r.progress.jsonl``."""
    output = Path(output)
    return output.with_name(output.stem + ".progress.jsonl")


def read_progress(path: str | Path) -> tuple[dict, list[dict]]:
    """``(header, records)`` of a progress file, records in file order (a later line of the same
    run and group replaces an earlier one). Read-only: a partial last line (a write in progress)
    is ignored, not cut off, so a running evaluation's file can be read."""
    path = Path(path)
    lines = [x for x in path.read_text(encoding="utf-8").split("\n")[:-1] if x.strip()]  # complete lines only
    try:
        header = json.loads(lines[0])["header"]
    except (IndexError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not an evaluation progress file (no header line)") from None
    records: dict[tuple[str, str], dict] = {}
    for n, line in enumerate(lines[1:], 2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {n} is not valid JSON") from None
        records[(rec["run"], rec["group_id"])] = rec
    return header, list(records.values())


class ProgressLog:
    """Append-only JSONL: a header line, then one ``{"run", "group_id", "cells"}`` per finished
    group, written and flushed (and fsynced) as soon as the group is done. A partial last line (a
    crash while writing) is cut off on open. A header that differs from ``header`` (both as
    ``canonical`` writes them) is refused unless ``restart``, which starts a new file."""

    def __init__(self, path: str | Path, header: Mapping[str, Any], *, restart: bool = False,
                 canonical: Callable[[dict], dict] | None = None) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))
        self.records: dict[tuple[str, str], dict] = {}
        if restart and self.path.exists():
            self.path.unlink()
        lines = complete_lines(self.path) if self.path.exists() else []
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"header": self.header}, ensure_ascii=False) + "\n")
            return
        try:
            header = json.loads(lines[0])["header"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{self.path}: not an evaluation progress file (no header line); "
                             "delete it or use --restart true") from None
        if canonical is not None:
            header, want = canonical(header), canonical(self.header)
        else:
            want = self.header
        if header != want:
            keys = sorted(k for k in set(header) | set(want) if header.get(k) != want.get(k))
            raise ValueError(f"{self.path} was written by a different evaluation (differs in: {', '.join(keys)}); "
                             "use --restart true to discard it, or choose another --output")
        for n, line in enumerate(lines[1:], 2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}: line {n} is not valid JSON; delete the file or use --restart true") from None
            self.records[(rec["run"], rec["group_id"])] = rec

    def done(self, run: str, group_id: str) -> bool:
        return (run, group_id) in self.records

    def add(self, run: str, group_id: str, cells: list[list]) -> None:
        rec = {"run": run, "group_id": group_id, "cells": cells}
        append_line(self.path, json.dumps(rec, ensure_ascii=False))
        self.records[(run, group_id)] = json.loads(json.dumps(rec))


