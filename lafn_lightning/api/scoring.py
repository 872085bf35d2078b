"""``lafn evaluate``: edit what is missing, then score Reliability, Generality, Locality, Portability.

    results = evaluate(Settings.from_config("demo", overrides={"data.groups": "0:50"}), output="runs/r.json")

The protocol lives in :mod:`lafn_lightning.evaluation.protocol`; settings, modes and file
formats: docs/evaluation-protocol.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from ..backbone.fingerprint import fingerprint
from ..backbone.loading import load_backbone
from ..cache import CacheError, EditCache
from ..cache.manifest import stored_routing
from ..data import EditGroup, default_dataset, normalize_language, write_jsonl
from ..evaluation.protocol import (MODES, PROGRESS_VERSION, SETTINGS, ProgressLog, _json_numbers, _markdown,
                                   _matrix_markdown, _section, aggregate, score_group, _MODE_ALIASES)
from ..files import atomic_write, check_writable
from ..inference.edited_model import EditedModel
from ..routing.keys import KEYS_FILE
from ..routing.settings import ACCEPTANCE_SETTINGS, READ_HINT
from ..text.matching import MATCHERS
from .edit import edit_dataset
from .progress import RunProgress, report_skipped, tensorboard_dir
from .settings import Settings

__all__ = ["evaluate"]

@dataclass
class _Run:
    name: str                       # "multilingual" or the edit language
    cache_dir: Path
    test_languages: list[str]
    groups: list[EditGroup]         # editable groups, in selection order (all loaded languages)
    skipped: list[str]              # group ids that cannot be edited in this run
    edit_groups: list[EditGroup] = dataclasses.field(default_factory=list)  # one-language runs: what is edited


def _mode(value: str) -> str:
    mode = _MODE_ALIASES.get(value.strip().lower(), value.strip().lower())
    if mode not in MODES:
        raise ValueError(f"mode={value!r}: one of {', '.join(MODES)}")
    return mode


def _alone(group: EditGroup, lang: str) -> EditGroup | None:
    """The group reduced to ``lang`` for a one-language edit, or None if it cannot be edited so.

    The language's own subject is kept when it occurs in its edit question; else the longest
    subject of the whole group that occurs there (MzsRE questions often carry another language's
    form, e.g. the English name inside a Thai question) becomes the subject; with neither, the
    group cannot be edited in ``lang`` alone."""
    e = group.edits[lang]
    found = [s for s in (e.subject, *group.subjects) if s and s in e.prompt]
    if not found:
        return None
    return dataclasses.replace(group, edits={lang: dataclasses.replace(e, subject=found[0])})


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _write_tensorboard(log_dir: Path, results: Mapping[str, Any], markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def scalars(prefix: str, section: Mapping[str, Any]):
        for view, block in (("teacher_forced", section), ("generation", section.get("generation"))):
            if not block:
                continue
            for setting in [x for x in SETTINGS if x in block]:
                for metric, row in block[setting].items():
                    for lang, cell in row.items():
                        for k, v in cell.items():
                            if v is not None:
                                yield f"{prefix}{view}/{setting}/{metric}/{lang}/{k}", v

    with contextlib.closing(SummaryWriter(str(log_dir))) as writer:
        for tag, value in scalars("", results):
            writer.add_scalar(tag, value, 0)
        for x, section in results.get("by_edit_language", {}).items():
            for tag, value in scalars(f"by_edit_language/{x}/", section):
                writer.add_scalar(tag, value, 0)
        writer.add_text("evaluation", markdown, 0)


def evaluate(settings: Settings, output: str, mode: str = "multilingual", edit_languages: list[str] | None = None,
             edit_batch_size: int = 4, generation: bool = True, margin: int = 0, matcher: str = "exact",
             batch_size: int = 16, log_dir: str | None = None, restart: bool = False, no_edit: bool = False,
             method: str | None = None) -> dict:
    """Edit every selected group not yet in the cache (:func:`edit_dataset`), then score the edits.

    Writes OUTPUT (JSON), OUTPUT with suffix .md (the tables), OUTPUT with suffix .progress.jsonl
    (per-group scores; resume) and TensorBoard scalars; returns the results. Settings, modes and
    file formats: docs/evaluation-protocol.md.

    Args:
        settings: the parsed config; ``data.groups`` selects the groups, ``cache_dir`` the cache
            (monolingual/cross-lingual: one subfolder per edit language).
        output: the results JSON file.
        mode: ``multilingual`` (edit all languages at once), ``monolingual`` or ``cross-lingual``.
        edit_languages: monolingual/cross-lingual: the languages to edit in (default: every selected one).
        edit_batch_size: groups per fit when editing (K).
        generation: also score free greedy generation.
        margin: generation: tokens decoded beyond the answer's length (0: exactly its length, so EM is meaningful).
        matcher: subject matcher of the edited model: exact (the paper's), normalized, fuzzy, or router
            (hidden-state routing with the settings recorded in the cache's router key file; what
            the routing section sets of threshold, lexical_threshold, lexical_tiers replaces them
            for this evaluation; docs/router.md).
        batch_size: probes per forward.
        log_dir: TensorBoard directory (default: the config's logger directory + /evaluate).
        restart: discard the progress file of an earlier run.
        no_edit: do not edit; evaluate the groups already in the cache.
        method: score a comparison method instead of LU-LAFNs: a method config (a path or a shipped
            name such as ``methods/memit-demo``, ``methods/lora_ft-demo``, ``methods/remake-demo``:
            ``method: {class_path, init_args}``). Each group is edited alone in all its languages
            (edit_one_test_one; no all_cached setting), in every mode; results and artifacts go to
            ``cache_dir/<method name>`` (per edit language in the one-language modes) and are reused
            on resume.
    """
    mode = _mode(mode)
    _check_options(mode, edit_languages, edit_batch_size, batch_size, margin, matcher)
    check_writable(output, what="--output")   # before the backbone loads, not after the evaluation
    editor = _load_method(method) if method else None
    own = SimpleNamespace(mode=mode, edit_languages=edit_languages, edit_batch_size=edit_batch_size,
                          generation=generation, margin=margin, matcher=matcher, batch_size=batch_size,
                          log_dir=log_dir, restart=restart, no_edit=no_edit, cache_dir=str(settings.cache_dir),
                          output=output, routing=settings.routing)
    started = time.perf_counter()
    cache_dir = Path(own.cache_dir) / editor.name if editor is not None else Path(own.cache_dir)
    output = Path(own.output)
    hp = SimpleNamespace(**settings.model)
    selection = settings.load_selection()
    groups, skipped_records = selection.groups, selection.skipped
    report_skipped(skipped_records)   # select() refuses a selection that keeps no group
    languages = list(groups[0].languages)

    runs = _plan_runs(own, groups, languages, cache_dir)
    _refuse_caches_of_other_languages(own, runs, languages, editor)
    edit_seconds = _edit_missing(settings, own, runs, editor)
    if own.matcher == "router" and editor is None:
        _report_routing(own.routing, runs)

    model, tokenizer = load_backbone(hp.backbone, hp.dtype)
    caches = _open_caches(runs, editor)
    header = _progress_header(settings, own, hp, runs, caches, languages, fingerprint(model, list(hp.layers)), editor)
    progress = ProgressLog(output.with_name(output.stem + ".progress.jsonl"), header, restart=own.restart,
                           canonical=_canonical_header)
    log_dir = _log_dir(settings, own, output)
    t0 = time.perf_counter()
    not_cached = _score_runs(model, tokenizer, own, hp, runs, caches, progress, editor, log_dir=log_dir,
                             skipped=len(skipped_records))
    eval_seconds = time.perf_counter() - t0

    results, markdown = _write_results(own, runs, progress, languages, header, not_cached, skipped_records,
                                       output, log_dir)
    n_eval = sum(len(r.groups) - len(not_cached[r.name]) for r in runs)
    print(f"[lafn] evaluated {n_eval} group evaluation(s) ({own.mode}, languages {','.join(languages)}) in "
          f"{time.perf_counter() - started:.0f}s (editing {edit_seconds:.0f}s, scoring {eval_seconds:.0f}s); "
          f"wrote {output}, {output.with_suffix('.md')}" + (f", TensorBoard {log_dir}" if log_dir else ""),
          file=sys.stderr)
    print(markdown)
    return results


def _check_options(mode: str, edit_languages, edit_batch_size: int, batch_size: int, margin: int,
                   matcher: str) -> None:
    """Refuse option values :func:`evaluate` cannot run with, before anything is read or loaded."""
    if edit_batch_size < 1 or batch_size < 1 or margin < 0:
        raise ValueError("edit_batch_size and batch_size must be >= 1, margin >= 0")
    if matcher not in (*MATCHERS, "router"):
        raise ValueError(f"matcher={matcher!r}: one of {', '.join(MATCHERS)}, router")
    if edit_languages and mode == "multilingual":
        raise ValueError("edit_languages applies to mode monolingual or cross-lingual; multilingual edits every "
                         "language of data.languages")


def _plan_runs(own, groups: list[EditGroup], languages: list[str], cache_dir: Path) -> list[_Run]:
    """The runs of an evaluation: which cache, which groups, which test languages. Multilingual:
    one run over every language; monolingual / cross-lingual: one run per edit language, with
    the groups reduced to it (:func:`_alone`; a group that cannot be is left out, and said so)."""
    if own.mode == "multilingual":
        return [_Run("multilingual", cache_dir, languages, groups, [])]
    if own.edit_languages:
        edit_langs = [normalize_language(x, where="edit_languages") for x in own.edit_languages]
        missing = [x for x in edit_langs if x not in languages]
        if missing:
            raise ValueError(f"edit_languages {missing} are not among the selected languages {languages} "
                             "(--data.languages)")
    else:
        edit_langs = languages
    runs = []
    for x in edit_langs:
        alone = {g.group_id: _alone(g, x) for g in groups}
        run = _Run(x, cache_dir / x, [x] if own.mode == "monolingual" else languages,
                   [g for g in groups if alone[g.group_id] is not None],
                   [g.group_id for g in groups if alone[g.group_id] is None])
        run.edit_groups = [alone[g.group_id] for g in run.groups]
        runs.append(run)
        if run.skipped:
            print(f"[lafn] {x}: {len(run.skipped)} group(s) cannot be edited in {x} alone (no subject of the group "
                  f"occurs in the {x} question); left out of this run", file=sys.stderr)
    return runs


def _refuse_caches_of_other_languages(own, runs: list[_Run], languages: list[str], editor) -> None:
    """A cache whose groups were edited in other languages than this evaluation edits would be
    skipped by edit-dataset and silently scored: refused."""
    for run in runs:
        if editor is not None or not (run.cache_dir / "manifest.json").exists():
            continue
        existing = EditCache.open(run.cache_dir)
        cached = set(existing.group_ids)
        want = set(languages) if own.mode == "multilingual" else {run.name}
        bad = [g.group_id for g in run.groups if g.group_id in cached and set(existing.subjects(g.group_id)) != want]
        if bad:
            got = sorted(existing.subjects(bad[0]))
            raise ValueError(f"{run.cache_dir}: group {bad[0]} (and {len(bad) - 1} more) was edited in languages {got}, "
                             f"but this evaluation edits in {sorted(want)}; use another --cache_dir")


def _edit_missing(settings: Settings, own, runs: list[_Run], editor) -> float:
    """Edit what is not cached yet (:func:`edit_dataset` per run; a one-language run from a JSONL
    file of its reduced groups); with ``no_edit``, refuse a run without a cache. Nothing for a
    comparison method (it edits while scoring). Returns the seconds spent editing."""
    if own.no_edit and editor is None:
        missing = [str(run.cache_dir) for run in runs if run.groups and not (run.cache_dir / "manifest.json").exists()]
        if missing:
            raise CacheError(f"no_edit: no edit cache at {', '.join(missing)}; drop --no_edit to edit first, "
                             "or point --cache_dir at an existing cache")
    if own.no_edit or editor is not None:
        return 0.0
    t0 = time.perf_counter()
    for run in runs:
        if not run.groups:
            continue
        run_settings = settings.replace(cache_dir=str(run.cache_dir))
        if own.mode != "multilingual":
            # the one-language groups (subject as it occurs in the question) as a JSONL dataset
            source = run.cache_dir / f"edits-{run.name}.jsonl"
            source.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(run.edit_groups, source)
            run_settings = run_settings.replace(data={"dataset": str(source), "format": "jsonl",
                                                      "languages": [run.name], "groups": None, "paraphrases": None})
        edit_dataset(run_settings, edit_batch_size=own.edit_batch_size)
    return time.perf_counter() - t0


def _report_routing(routing, runs: list[_Run]) -> None:
    """Before the backbone loads: refuse ``routing`` whose key settings differ from a run's router
    keys (one line), and say once per cache which recorded acceptance settings it replaces for
    this evaluation."""
    for run in runs:
        stored = stored_routing(run.cache_dir)
        if stored is None:
            continue   # the routed model says what is missing
        used = routing.over(stored, where=f"router keys {run.cache_dir / KEYS_FILE}", hint=READ_HINT)
        changed = [f"routing.{k}={getattr(used, k)!r} (recorded: {getattr(stored, k)!r})"
                   for k in ACCEPTANCE_SETTINGS if getattr(used, k) != getattr(stored, k)]
        if changed:
            print(f"[lafn] {run.cache_dir}: routing with {', '.join(changed)} for this evaluation", file=sys.stderr)


def _open_caches(runs: list[_Run], editor) -> dict[str, EditCache | None]:
    """Run name -> its edit cache (None: none on disk, or a comparison method is scored). Every
    selected group the cache holds is read once here, so a missing, corrupt or non-finite ΔV is
    refused (:class:`CacheError`, one line) before any group is scored."""
    caches: dict[str, EditCache | None] = {}
    for run in runs:
        exists = editor is None and (run.cache_dir / "manifest.json").exists()
        cache = caches[run.name] = EditCache.open(run.cache_dir) if exists else None
        if cache is not None:
            held = set(cache.group_ids)
            for group in run.groups:
                if group.group_id in held:
                    cache.entry(group.group_id)
    return caches


def _progress_header(settings: Settings, own, hp, runs: list[_Run], caches: Mapping[str, EditCache | None],
                     languages: list[str], fp: dict, editor) -> dict:
    """The progress file's header: what a resumed evaluation must agree with (:class:`ProgressLog`)."""
    return {
        "version": PROGRESS_VERSION,
        "mode": own.mode,
        "languages": languages,
        "runs": {r.name: {"test_languages": r.test_languages, "groups": [g.group_id for g in r.groups],
                          "cache": str(r.cache_dir),
                          "cached_groups": _digest(sorted(caches[r.name].group_ids)) if caches[r.name] else None}
                 for r in runs},
        "dataset": str(settings.data.get("dataset") or default_dataset()),
        "backbone": {"name": fp["name"], "layers": fp["edited_layers"], "layers_hash": fp["layers_hash"]},
        "site": hp.site,
        "matcher": own.matcher,
        "method": _method_record(editor),
        "generation": own.generation,
        "margin": own.margin,
    }


def _log_dir(settings: Settings, own, output: Path) -> Path | None:
    """TensorBoard directory: ``--log_dir``, else the config logger's ``evaluate/<output stem>``."""
    log_dir = Path(own.log_dir) if own.log_dir else tensorboard_dir(settings.config, "evaluate")
    if log_dir is not None and not own.log_dir:
        log_dir = log_dir / output.stem
    return log_dir


def _score_runs(model, tokenizer, own, hp, runs: list[_Run], caches: Mapping[str, EditCache | None],
                progress: ProgressLog, editor, *, log_dir: Path | None, skipped: int) -> dict[str, list[str]]:
    """Score every group of every run that ``progress`` does not hold yet (:func:`score_group`:
    edit_one_test_one and all_cached for LU-LAFN, edit_one_test_one for a comparison method, which
    edits the group here) and add its cells to ``progress``. Returns, per run, the groups not in
    its cache (not scored)."""
    from tqdm.auto import tqdm

    total = sum(len(r.groups) for r in runs)
    done_before = sum(progress.done(r.name, g.group_id) for r in runs for g in r.groups)
    if done_before:
        print(f"[lafn] resuming: {done_before} of {total} group evaluations already in {progress.path}",
              file=sys.stderr)
    not_cached: dict[str, list[str]] = {}
    report = RunProgress("evaluate", total, done_before, log_dir=log_dir, every_n_seconds=30.0)
    with tqdm(total=total, initial=done_before, desc="evaluate", unit="group") as bar, contextlib.closing(report):
        def tick():   # one group done (scored, or not in the cache)
            bar.update(1)
            report.update(1, skipped=skipped, not_in_cache=sum(map(len, not_cached.values())))

        for run in runs:
            cache = caches[run.name]
            todo = [g for g in run.groups if not progress.done(run.name, g.group_id)]
            cached_ids = set(cache.group_ids) if cache is not None else set()
            if editor is not None:   # what the method edits: the group, or in one language alone
                cached_ids = {g.group_id for g in run.groups}
                edit_of = {g.group_id: e for g, e in zip(run.groups, run.edit_groups)}
                if todo and hasattr(editor, "prepare"):
                    editor.prepare(model, tokenizer, run.edit_groups or run.groups, run.cache_dir)
            not_cached[run.name] = [g.group_id for g in run.groups if g.group_id not in cached_ids]
            if not todo:
                continue
            routed = {"routing": own.routing} if own.matcher == "router" else {}
            all_cached = EditedModel(model, tokenizer, cache, matcher=own.matcher, site=hp.site, **routed) if cache else None
            for group in todo:
                if group.group_id not in cached_ids:
                    tick()
                    continue
                with contextlib.ExitStack() as stack:
                    if editor is not None:   # edit this group alone (or reuse its artifact), score, undo
                        edited = {"edit_one_test_one": stack.enter_context(
                            editor.edited(model, tokenizer, [edit_of.get(group.group_id, group)], run.cache_dir))}
                    else:
                        edited = {"edit_one_test_one": EditedModel(model, tokenizer, cache, matcher=own.matcher,
                                                                   site=hp.site, groups=[group.group_id], **routed),
                                  "all_cached": all_cached}
                    cells = score_group(model, tokenizer, group, edited, languages=run.test_languages,
                                        generation=own.generation, margin=own.margin, batch_size=own.batch_size)
                progress.add(run.name, group.group_id, cells)
                tick()
                bar.set_postfix_str(f"{run.name}:{group.group_id}")
    return not_cached


def _write_results(own, runs: list[_Run], progress: ProgressLog, languages: list[str], header: dict,
                   not_cached: dict[str, list[str]], skipped_records: Mapping[str, str], output: Path,
                   log_dir: Path | None) -> tuple[dict, str]:
    """Aggregate the progress file in selection order and write OUTPUT (JSON), its .md tables and
    the TensorBoard scalars; returns the results and the markdown."""
    results = _assemble(own, runs, progress, languages, header, not_cached)
    results["meta"]["skipped_records"] = skipped_records
    markdown = _results_markdown(own, results, languages, runs)
    results = _json_numbers(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    atomic_write(output.with_suffix(".md"), markdown)
    if log_dir is not None:
        _write_tensorboard(log_dir, results, markdown)
    return results, markdown


def _load_method(name: str):
    """The comparison method of a method config (``method: {class_path, init_args}``)."""
    import yaml

    from ..methods.config import from_config
    from .settings import resolve_config

    try:
        path = resolve_config(name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(str(exc).replace(f"-c {name}:", f"--method {name}:", 1)) from None
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"--method {path}: not YAML ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("method"), dict) or "class_path" not in spec["method"]:
        raise ValueError(f"--method {path}: needs a 'method:' block with class_path and init_args "
                         "(see configs/methods/*-demo.yaml)")
    try:
        editor = from_config(spec["method"])
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--method {path}: method.class_path {spec['method']['class_path']!r} cannot be "
                         f"imported ({exc})") from None
    except TypeError as exc:
        raise ValueError(f"--method {path}: method.init_args: {exc}") from None
    if not callable(getattr(editor, "edited", None)):
        raise ValueError(f"--method {path}: {spec['method']['class_path']} has no edited() "
                         "(see lafn_lightning.methods.base)")
    return editor


def _method_record(editor) -> dict | None:
    if editor is None:
        return None
    return {"name": editor.name, "class": f"{type(editor).__module__}.{type(editor).__qualname__}",
            "hparams": json.loads(json.dumps(dataclasses.asdict(editor), default=str))
            if dataclasses.is_dataclass(editor) else {}}


def _canonical_header(header: dict) -> dict:
    """``header`` with its method's class path replaced by that of the class it names (a progress file
    that names the method by a deprecated class name resumes)."""
    method = header.get("method")
    if not isinstance(method, dict) or not isinstance(method.get("class"), str):
        return header
    module, _, name = method["class"].rpartition(".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return header
    return {**header, "method": {**method, "class": f"{cls.__module__}.{cls.__qualname__}"}}


def _assemble(own, runs: list[_Run], progress: ProgressLog, languages: list[str], header: dict,
              not_cached: dict[str, list[str]]) -> dict:
    def records(selected: Iterable[_Run]):
        for run in selected:
            for g in run.groups:
                rec = progress.records.get((run.name, g.group_id))
                if rec is not None:
                    yield rec

    if own.mode == "multilingual":
        include = lambda run, lang: True  # noqa: E731
    elif own.mode == "monolingual":
        include = lambda run, lang: run == lang  # noqa: E731
    else:
        include = lambda run, lang: run != lang  # noqa: E731
    results = _section(aggregate(records(runs), languages, include), own.generation)
    if own.mode == "cross-lingual":
        results["by_edit_language"] = {r.name: _section(aggregate(records([r]), languages), own.generation)
                                       for r in runs}
    results["meta"] = {
        "mode": own.mode,
        "dataset": header["dataset"],
        "backbone": header["backbone"],
        "site": header["site"],
        "matcher": own.matcher,
        "method": header["method"],
        "languages": languages,
        "runs": {r.name: {"cache_dir": str(r.cache_dir), "test_languages": r.test_languages,
                          "groups_evaluated": sum((r.name, g.group_id) in progress.records for g in r.groups),
                          "skipped": r.skipped, "not_in_cache": not_cached.get(r.name, [])} for r in runs},
        "generation_margin": own.margin if own.generation else None,
        "f1": "token F1 over the multiset of token ids, 2PR/(P+R); EM on decoded strings; x100",
        "locality": "edited vs unedited prediction on the locality question; pre_edit locality is null",
        "avg": "macro-average over the languages",
    }
    return results


def _results_markdown(own, results: Mapping[str, Any], languages: list[str], runs: list[_Run]) -> str:
    meta = results["meta"]
    n = {r.name: meta["runs"][r.name]["groups_evaluated"] for r in runs}
    title = f"{meta['method']['name']} (comparison method)" if meta.get("method") else "LU-LAFN"
    edits = (f"method `{meta['method']['class']}`" if meta.get("method")
             else f"layers {meta['backbone']['layers']}, matcher `{own.matcher}`")
    head = [f"# {title} evaluation ({own.mode})", "",
            f"Dataset `{meta['dataset']}`, backbone `{meta['backbone']['name']}`, {edits}; groups evaluated: "
            + ", ".join(f"{k}: {v}" for k, v in n.items()) + ". Cells: F1 / EM (x100).", ""]
    if own.mode == "cross-lingual":
        title = "Cross-lingual transfer (test language T, pooled over edits in languages other than T)"
    elif own.mode == "monolingual":
        title = "Monolingual (column X: edited and tested in X)"
    else:
        title = "Multilingual (edited in all languages at once)"
    body = [_markdown(title, results, languages, own.generation)]
    if meta.get("skipped_records"):
        body.append(f"\n## Skipped records ({len(meta['skipped_records'])})\n\n"
                    + "".join(f"- `{gid}`: {why}\n" for gid, why in meta["skipped_records"].items()))
    if own.mode == "cross-lingual":
        by_edit = results["by_edit_language"]
        for view in ("teacher_forced", "generation") if own.generation else ("teacher_forced",):
            blocks = [b if view == "teacher_forced" else b["generation"] for b in by_edit.values()]
            for setting in [x for x in SETTINGS if all(x in b for b in blocks)]:
                body.append(_matrix_markdown(by_edit, languages, setting, view))
    return "\n".join(head + body)
