"""lafn evaluate: per-group scores, settings, modes, results files, resume."""
import json
import math

import pytest

from conftest import CONFIGS, strong_cache_of
from lafn_lightning.evaluation import protocol as evaluation
from lafn_lightning.cache import CacheError, EditCache
from lafn_lightning.data import read_jsonl
from lafn_lightning.inference.edited_model import EditedModel
from lafn_lightning.api import scoring as evaluate_api
from lafn_lightning.cli import run_command
from lafn_lightning.evaluation.protocol import SETTINGS, aggregate, group_probes, score_group
from lafn_lightning.evaluation.metrics import METRICS

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run_evaluate(tmp_path, *extra, output="out/results.json", cache="cache", steps="2"):
    args = ["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / cache), "--output", str(tmp_path / output),
            "--trainer.max_steps", steps, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            *QUIET, *extra]
    run_command("evaluate", args)
    return json.loads((tmp_path / output).read_text())


def _edit(subject, prompt, target, **probes):
    return {"subject": subject, "prompt": prompt, "target": target, **probes}


def write_groups(path):
    """Two groups; the locality question of 'moon' mentions the subject of 'tower'.
    The German side of 'moon' has no subject in its question (cannot be edited in German alone).
    Subjects end the questions that must react to an edit: a tiny random model barely passes the
    ΔV at the subject on to later positions, but the answer's first token is predicted right there."""
    records = [
        {"id": "tower", "edits": {
            "en": _edit("Gustave Tower", "Which city has the Gustave Tower?", "Rome",
                        rephrase="The Gustave Tower stands in which city?",
                        locality_prompt="Who painted the Mona Lisa?", locality_answer="Leonardo da Vinci",
                        portability_prompt="In which country is the Gustave Tower?", portability_answer="Italy"),
            "de": _edit("Gustave-Turm", "Welche Stadt hat den Gustave-Turm?", "Rom",
                        rephrase="In welcher Stadt steht der Gustave-Turm?",
                        locality_prompt="Wer malte die Mona Lisa?", locality_answer="Leonardo da Vinci",
                        portability_prompt="In welchem Land ist der Gustave-Turm?", portability_answer="Italien")}},
        {"id": "moon", "edits": {
            "en": _edit("Apollo Base", "Who built the Apollo Base", "Ada Lovelace",
                        rephrase="The Apollo Base was built by whom?",
                        locality_prompt="Is Big Ben smaller than the Gustave Tower", locality_answer="yes",
                        portability_prompt="Where did the builder of the Apollo Base live?", portability_answer="London"),
            "de": _edit("Apollo-Basis", "Wer hat die Mondstation gebaut?", "Ada Lovelace",
                        rephrase="Von wem wurde die Mondstation gebaut?",
                        locality_prompt="Ist Big Ben kleiner als der Gustave-Turm", locality_answer="ja")}},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- probes


def test_group_probes_take_each_question_once_and_skip_missing_ones(tmp_path):
    groups = read_jsonl(write_groups(tmp_path / "g.jsonl"))
    probes = group_probes(groups[1])
    assert [(p.metric, p.language) for p in probes] == [
        ("reliability", "en"), ("generality", "en"), ("locality", "en"), ("portability", "en"),
        ("reliability", "de"), ("generality", "de"), ("locality", "de")]      # no German portability probe
    assert probes[2].prompt == "Is Big Ben smaller than the Gustave Tower" and probes[2].target == "yes"
    assert [p.language for p in group_probes(groups[1], ["de"])] == ["de"] * 3


# ------------------------------------------------------------------------- settings on a hand-made cache


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory):
    """Both groups cached with a large ΔV on every neuron of the edited layers (certain to change outputs)."""
    tmp = tmp_path_factory.mktemp("strong")
    return strong_cache_of(tmp, read_jsonl(write_groups(tmp / "g.jsonl")))


def _cells(cells, **where):
    keys = ("view", "setting", "metric", "language")
    return [c for c in cells if all(c[keys.index(k)] == v for k, v in where.items())]


def test_edit_one_test_one_and_all_cached_differ_where_another_subject_occurs(strong_cache):
    groups, cache, model, tok = strong_cache
    moon = groups[1]
    one = EditedModel(model, tok, cache, groups=["moon"])
    everything = EditedModel(model, tok, cache)
    cells = score_group(model, tok, moon, {"edit_one_test_one": one, "all_cached": everything}, generation=True)
    for view in ("teacher_forced", "generation"):
        # 'moon' alone: its locality question names no subject of 'moon' -> the unedited model, exactly.
        for c in _cells(cells, view=view, setting="edit_one_test_one", metric="locality"):
            assert c[4:6] == [1.0, 1.0]
        # every edit cached: the question names 'tower' (English and German forms) -> tower's ΔV fires.
        hurt = _cells(cells, view=view, setting="all_cached", metric="locality")
        assert len(hurt) == 2 and all(c[4] < 1.0 and c[5] == 0.0 for c in hurt)
        # probes that only mention moon's own subject score the same in both settings
        for metric in ("reliability", "generality", "portability"):
            a = _cells(cells, view=view, setting="edit_one_test_one", metric=metric, language="en")
            b = _cells(cells, view=view, setting="all_cached", metric=metric, language="en")
            assert a == [[view, "edit_one_test_one", *b[0][2:]]]
    assert not _cells(cells, setting="pre_edit", metric="locality")       # the reference is the unedited model
    # the all-cached model really finds the other group's subject in that question
    enc = tok(["Is Big Ben smaller than the Gustave Tower"], return_tensors="pt")
    assert [s.group_id for s in everything.find_sites(enc.input_ids, enc.attention_mask)] == ["tower"]
    assert one.find_sites(enc.input_ids, enc.attention_mask) == []


def test_identical_edit_sites_reuse_predictions_and_give_the_same_cells(strong_cache, monkeypatch):
    groups, cache, model, tok = strong_cache
    from lafn_lightning.evaluation import metrics

    calls = []
    for name in ("teacher_forced_predictions", "greedy_predictions"):
        real = getattr(metrics, name)
        monkeypatch.setattr(metrics, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    everything = EditedModel(model, tok, cache)
    for group, expected_runs in ((groups[0], 2), (groups[1], 3)):
        one = EditedModel(model, tok, cache, groups=[group.group_id])
        settings = {"edit_one_test_one": one, "all_cached": everything}
        calls.clear()
        fast = score_group(model, tok, group, settings)
        # 'tower': no probe names 'moon', so all_cached injects exactly where edit_one does: not run again.
        # 'moon': its locality probe names 'tower', so all_cached runs.
        assert calls.count("teacher_forced_predictions") == expected_runs
        assert calls.count("greedy_predictions") == expected_runs
        assert fast == score_group(model, tok, group, settings, reuse=False)


def test_aggregate_means_and_filters():
    records = [
        {"run": "en", "group_id": "a", "cells": [["teacher_forced", "all_cached", "reliability", "en", 1.0, 1.0, "x"],
                                                 ["teacher_forced", "all_cached", "reliability", "de", 0.5, 0.0, "y"]]},
        {"run": "de", "group_id": "a", "cells": [["teacher_forced", "all_cached", "reliability", "en", 0.0, 0.0, "z"],
                                                 ["teacher_forced", "all_cached", "reliability", "de", 0.25, 0.0, "w"]]},
    ]
    every = aggregate(records, ["en", "de"])["teacher_forced"]["all_cached"]["reliability"]
    assert every["en"] == {"f1": 50.0, "em": 50.0} and every["de"] == {"f1": 37.5, "em": 0.0}
    assert every["avg"] == {"f1": 43.75, "em": 25.0}
    diagonal = aggregate(records, ["en", "de"], include=lambda run, lang: run == lang)["teacher_forced"]["all_cached"]
    assert diagonal["reliability"]["en"]["f1"] == 100.0 and diagonal["reliability"]["de"]["f1"] == 25.0
    assert math.isnan(diagonal["locality"]["en"]["f1"])


def test_progress_lines_may_hold_unicode_line_separators(tmp_path):
    log = evaluation.ProgressLog(tmp_path / "p.jsonl", {"version": 1})
    log.add("multilingual", "g", [["teacher_forced", "all_cached", "reliability", "en", 1.0, 1.0, "a\u2028b\x85c"]])
    again = evaluation.ProgressLog(tmp_path / "p.jsonl", {"version": 1})
    assert again.records[("multilingual", "g")]["cells"][0][6] == "a\u2028b\x85c"
    with pytest.raises(ValueError, match="different evaluation.*version"):
        evaluation.ProgressLog(tmp_path / "p.jsonl", {"version": 2})


# -------------------------------------------------------------------------------- the command, end to end


def test_results_files_schema_and_tensorboard(tmp_path):
    res = run_evaluate(tmp_path, "--data.groups", "0:2", "--log_dir", str(tmp_path / "tb"))
    assert set(res) == {*SETTINGS, "generation", "meta"}
    for block in (res, res["generation"]):
        for setting in SETTINGS:
            assert list(block[setting]) == list(METRICS)
            for metric, row in block[setting].items():
                assert list(row) == ["en", "zh", "avg"]
                for lang, cell in row.items():
                    assert set(cell) == {"f1", "em"}
                    if setting == "pre_edit" and metric == "locality":
                        assert cell == {"f1": None, "em": None}
                    else:
                        assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in cell.values())
    # the edits were applied: the edited predictions of the edit questions are not the unedited ones
    progress = [json.loads(x) for x in (tmp_path / "out/results.progress.jsonl").read_text().splitlines()[1:]]
    preds = {(c[1], c[3]): [] for r in progress for c in r["cells"]}
    for r in progress:
        for view, setting, metric, lang, _, _, text, *_ in r["cells"]:
            if view == "teacher_forced" and metric == "reliability":
                preds[(setting, lang)].append(text)
    for lang in ("en", "zh"):
        assert preds[("edit_one_test_one", lang)] != preds[("pre_edit", lang)]
    # MzsRE locality questions name no edited subject: exactly the unedited model's answers
    for block in (res, res["generation"]):
        for setting in ("edit_one_test_one", "all_cached"):
            assert all(c == {"f1": 100.0, "em": 100.0} for c in block[setting]["locality"].values())
    meta = res["meta"]
    assert meta["mode"] == "multilingual" and meta["languages"] == ["en", "zh"]
    assert meta["runs"]["multilingual"]["groups_evaluated"] == 2
    assert sorted(EditCache.open(tmp_path / "cache").group_ids) == ["mzsre:0", "mzsre:1"]
    md = (tmp_path / "out/results.md").read_text()
    assert md.count("| Metric | en | zh | Avg |") == 6 and "| Locality | n/a | n/a | n/a |" in md
    lines = (tmp_path / "out/results.progress.jsonl").read_text().splitlines()
    assert "header" in json.loads(lines[0]) and [json.loads(x)["group_id"] for x in lines[1:]] == ["mzsre:0", "mzsre:1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tag = "teacher_forced/edit_one_test_one/reliability/en/f1"
    assert acc.Scalars(tag)[0].value == pytest.approx(res["edit_one_test_one"]["reliability"]["en"]["f1"], abs=1e-4)
    assert "generation/all_cached/locality/avg/em" in acc.Tags()["scalars"]


def test_interrupted_evaluation_resumes_without_redoing_groups(tmp_path, monkeypatch):
    selection = ["--data.groups", "0:3", "--generation", "false"]
    real = evaluation.score_group
    calls = []

    def crash_on_third(model, tok, group, *a, **k):
        calls.append(group.group_id)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(model, tok, group, *a, **k)

    monkeypatch.setattr(evaluate_api, "score_group", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_evaluate(tmp_path, *selection)
    progress = tmp_path / "out/results.progress.jsonl"
    assert len(progress.read_text().splitlines()) == 1 + 2
    assert not (tmp_path / "out/results.json").exists()
    with progress.open("a") as f:                                  # a crash in the middle of a write
        f.write('{"run": "multilingual", "group_id": "mzsre:2", "cel')

    calls.clear()
    monkeypatch.setattr(evaluate_api, "score_group", lambda *a, **k: (calls.append(a[2].group_id), real(*a, **k))[1])
    resumed = run_evaluate(tmp_path, *selection)
    assert calls == ["mzsre:2"]                                     # finished groups are not recomputed
    assert len(progress.read_text().splitlines()) == 1 + 3

    calls.clear()
    again = run_evaluate(tmp_path, *selection)                      # everything done: nothing recomputed
    assert calls == [] and again == resumed

    fresh = run_evaluate(tmp_path, *selection, output="fresh/results.json")   # same cache, uninterrupted
    assert calls == ["mzsre:0", "mzsre:1", "mzsre:2"]
    assert fresh == resumed
    assert (tmp_path / "fresh/results.md").read_text() == (tmp_path / "out/results.md").read_text()

    with pytest.raises(CacheError, match=r"made with other settings \(languages: cache has \['en', 'zh'\], "
                                         r"given \['en'\]\); use another cache directory"):
        run_evaluate(tmp_path, *selection, "--data.languages", "[en]", output="en/results.json")
    with pytest.raises(ValueError, match="different evaluation.*generation"):
        run_evaluate(tmp_path, "--data.groups", "0:3")              # same output, other settings
    restarted = run_evaluate(tmp_path, *selection, "--restart", "true")
    assert restarted == resumed


def test_monolingual_and_cross_lingual_modes(tmp_path):
    data = write_groups(tmp_path / "g.jsonl")
    common = ["--data.dataset", str(data), "--data.format", "jsonl", "--data.languages", "[en,de]", "--generation", "false"]
    mono = run_evaluate(tmp_path, *common, "--mode", "monolingual", output="mono/results.json")
    runs = mono["meta"]["runs"]
    assert set(runs) == {"en", "de"} and runs["en"]["test_languages"] == ["en"]
    assert runs["de"]["skipped"] == ["moon"] and runs["de"]["groups_evaluated"] == 1
    assert runs["en"]["groups_evaluated"] == 2
    # one cache per edit language, edited with that language only
    for lang, ids in (("en", ["moon", "tower"]), ("de", ["tower"])):
        cache = EditCache.open(tmp_path / "cache" / lang)
        assert sorted(cache.group_ids) == ids
        assert set(cache.subjects("tower")) == {lang}
    # columns come from the run edited in that language: the English column has 2 groups, German 1
    assert set(mono["edit_one_test_one"]["reliability"]) == {"en", "de", "avg"}
    assert mono["edit_one_test_one"]["locality"]["de"] == {"f1": 100.0, "em": 100.0}

    manifests = {lang: (tmp_path / "cache" / lang / "manifest.json").read_bytes() for lang in ("en", "de")}
    cross = run_evaluate(tmp_path, *common, "--mode", "cross-lingual", output="cross/results.json")
    assert set(cross) == {*SETTINGS, "by_edit_language", "meta"}
    assert set(cross["by_edit_language"]) == {"en", "de"}
    assert cross["meta"]["runs"]["en"]["test_languages"] == ["en", "de"]
    # the cross-lingual runs reuse the monolingual caches: nothing was edited again
    assert all((tmp_path / "cache" / lang / "manifest.json").read_bytes() == m for lang, m in manifests.items())
    # main table: test language T pooled over the runs edited in another language (here: exactly one)
    for setting in SETTINGS:
        for metric in METRICS:
            assert cross[setting][metric]["en"] == cross["by_edit_language"]["de"][setting][metric]["en"]
            assert cross[setting][metric]["de"] == cross["by_edit_language"]["en"][setting][metric]["de"]
    # an edit made in German only knows the German subject form: English questions never fire it
    assert cross["by_edit_language"]["de"]["edit_one_test_one"]["reliability"]["en"] == \
        cross["by_edit_language"]["de"]["pre_edit"]["reliability"]["en"]
    md = (tmp_path / "cross/results.md").read_text()
    assert "| edit \\ test | en | de | Avg |" in md
