"""Where each miss comes from: edit sites recorded per question by lafn evaluate, and the miss split."""
import json

import pytest
import torch
from torch import nn

from conftest import CONFIGS, strong_cache_of
from lafn_lightning.cli import run_command
from lafn_lightning.data import read_jsonl
from lafn_lightning.inference.edited_model import EditedModel
from lafn_lightning.evaluation.protocol import aggregate, cell_sites, read_progress, score_group, subject_end

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _edit(subject, prompt, target, **probes):
    return {"subject": subject, "prompt": prompt, "target": target, **probes}


# 'tower': every question names its subject. 'moon': the English rephrase names no subject
# ("the lunar station"), so no matcher finds it: the edit cannot fire there. The locality question
# of 'moon' names 'tower'.
RECORDS = [
    {"id": "tower", "edits": {
        "en": _edit("Gustave Tower", "Which city has the Gustave Tower?", "Rome",
                    rephrase="The Gustave Tower stands in which city?",
                    locality_prompt="Who painted the Mona Lisa?", locality_answer="Leonardo da Vinci")}},
    {"id": "moon", "edits": {
        "en": _edit("Apollo Base", "Who built the Apollo Base", "Ada Lovelace",
                    rephrase="Who constructed the lunar station?",
                    locality_prompt="Is Big Ben smaller than the Gustave Tower", locality_answer="yes")}},
]


def write_groups(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def strong_cache(tmp_path_factory):
    """Both groups cached with a large ΔV on every neuron of the edited layers."""
    tmp = tmp_path_factory.mktemp("strong")
    return strong_cache_of(tmp, read_jsonl(write_groups(tmp / "g.jsonl")))


def _cell(cells, view, setting, metric):
    (cell,) = [c for c in cells if c[:4] == [view, setting, metric, "en"]]
    return cell


# ------------------------------------------------------------------------------ recording in score_group


def test_subject_end_is_where_the_exact_matcher_fires(strong_cache):
    groups, cache, model, tok = strong_cache
    ids = tok("Is Big Ben smaller than the Gustave Tower").input_ids
    sites = EditedModel(model, tok, cache).find_sites(torch.tensor([ids]))
    assert [s.group_id for s in sites] == ["tower"]
    assert subject_end(tok, ids, "Gustave Tower") == sites[0].position
    assert subject_end(tok, ids, "Apollo Base") is None and subject_end(tok, ids, "") is None


@pytest.mark.parametrize("reuse", [True, False])
def test_score_group_records_the_sites_of_every_question(strong_cache, reuse):
    groups, cache, model, tok = strong_cache
    moon = groups[1]
    one = EditedModel(model, tok, cache, groups=["moon"])
    everything = EditedModel(model, tok, cache)
    cells = score_group(model, tok, moon, {"edit_one_test_one": one, "all_cached": everything}, reuse=reuse)
    assert cells and all(len(c) == 8 for c in cells)
    enc = tok(["Who built the Apollo Base"])
    end = subject_end(tok, enc.input_ids[0], "Apollo Base")
    assert end is not None
    for view in ("teacher_forced", "generation"):
        for setting in ("edit_one_test_one", "all_cached"):
            # the edit question: moon's own edit at the subject's last token
            assert cell_sites(_cell(cells, view, setting, "reliability")) == ([[end, "moon"]], end)
            # the rephrase names no subject: nothing fired, the subject's position is unknown
            assert cell_sites(_cell(cells, view, setting, "generality")) == ([], None)
        # the locality question names 'tower': only all_cached injects there, tower's ΔV
        assert cell_sites(_cell(cells, view, "edit_one_test_one", "locality")) == ([], None)
        sites, _ = cell_sites(_cell(cells, view, "all_cached", "locality"))
        assert [g for _, g in sites] == ["tower"]
        assert cell_sites(_cell(cells, view, "pre_edit", "reliability")) == ([], end)
    json.dumps(cells)                                              # written as JSON to the progress file


def test_a_model_without_find_sites_records_null(strong_cache):
    groups, cache, model, tok = strong_cache

    class Plain(nn.Module):                                          # a comparison method's edited model
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *a, **k):
            return self.inner(*a, **k)

        def generate(self, *a, **k):
            return self.inner.generate(*a, **k)

    cells = score_group(model, tok, groups[0], {"edit_one_test_one": Plain()}, generation=False)
    sites, end = cell_sites(_cell(cells, "teacher_forced", "edit_one_test_one", "reliability"))
    assert sites is None and end is not None


def test_aggregate_reads_cells_with_and_without_sites():
    old = ["teacher_forced", "all_cached", "reliability", "en", 1.0, 1.0, "x"]
    new = ["teacher_forced", "all_cached", "reliability", "en", 0.5, 0.0, "y", {"sites": [], "subject_end": None}]
    row = aggregate([{"run": "multilingual", "group_id": "a", "cells": [old, new]}],
                    ["en"])["teacher_forced"]["all_cached"]["reliability"]["en"]
    assert row == {"f1": 75.0, "em": 50.0}
    assert cell_sites(old) == (None, None)


# ---------------------------------------------------------------------------- lafn evaluate, end to end


def run_evaluate(tmp_path, *extra):
    args = ["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / "cache"),
            "--output", str(tmp_path / "out/results.json"), "--trainer.max_steps", "2", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path), "--data.dataset", str(write_groups(tmp_path / "g.jsonl")),
            "--data.format", "jsonl", "--data.languages", "[en]", "--generation", "false", *QUIET, *extra]
    run_command("evaluate", args)
    return tmp_path / "out/results.json"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    return run_evaluate(tmp_path_factory.mktemp("evaluate"))


def test_evaluate_records_sites_in_the_progress_file(evaluated):
    header, records = read_progress(evaluated.with_name("results.progress.jsonl"))
    cells = {r["group_id"]: r["cells"] for r in records}
    assert set(cells) == {"tower", "moon"}
    for gid, group_cells in cells.items():
        for c in group_cells:
            sites, end = cell_sites(c)
            assert sites is not None, c
            if c[1] != "pre_edit" and c[2] in ("reliability", "generality") and end is not None:
                assert [end, gid] in sites, c                 # the own edit fired at the subject's last token
            assert ("first_token" in c[7]) == (c[2] != "locality"), c
            if c[5] == 1.0 and c[2] != "locality":            # an exact hit starts with the right token
                assert c[7]["first_token"] is True, c
    firsts = {c[7]["first_token"] for group_cells in cells.values() for c in group_cells if c[2] != "locality"}
    assert firsts == {True, False}                            # pre-edit predictions start wrong
    assert cell_sites(_cell(cells["moon"], "teacher_forced", "all_cached", "generality")) == ([], None)


def test_miss_report_puts_a_question_without_its_subject_under_not_routed(evaluated, tmp_path, capsys):
    from lafn_lightning.cli import main

    main(["miss-report", str(evaluated), "--output", str(tmp_path / "misses.md")])
    split = json.loads((tmp_path / "misses.json").read_text())
    assert split["setting"] == "all_cached" and split["metric"] == "generality" and split["languages"] == ["en"]
    moon = [e for e in split["examples"] if e["group_id"] == "moon"]
    assert len(moon) == 1 and moon[0]["category"] == "not_routed" and moon[0]["sites"] == []
    assert split["f1"]["en"]["counts"]["not_routed"] >= 1
    assert split["f1"]["en"]["questions"] == 2
    md = (tmp_path / "misses.md").read_text()
    assert "| en | 2 |" in md and "not routed" in md and md in capsys.readouterr().out


def test_miss_report_refuses_missing_or_old_progress_files(tmp_path, capsys):
    from lafn_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["miss-report", str(tmp_path / "none.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no progress file" in err and err.count("\n") == 1
    old = ["teacher_forced", "all_cached", "generality", "en", 0.5, 0.0, "x"]          # 7 elements: no sites
    (tmp_path / "old.progress.jsonl").write_text(
        json.dumps({"header": {"languages": ["en"], "mode": "multilingual", "method": None}}) + "\n"
        + json.dumps({"run": "multilingual", "group_id": "a", "cells": [old]}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["miss-report", str(tmp_path / "old.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--restart true" in err and err.count("\n") == 1


# ----------------------------------------------------------------------- the split, on hand-made cells


def _c(lang, f1, em, sites, end, metric="generality", setting="all_cached", pred="p", first=True):
    extra = {"sites": sites, "subject_end": end, "first_token": first}
    return ["teacher_forced", setting, metric, lang, f1, em, pred, extra]


def test_classify_each_category():
    from lafn_lightning.evaluation.miss_report import classify

    assert classify("g", [], 4) == "not_routed"
    assert classify("g", [[4, "h"]], 4) == "other_group"
    assert classify("g", [[2, "g"]], 4) == "other_token"
    assert classify("g", [[2, "g"], [4, "h"]], 4) == "other_token"
    assert classify("g", [[4, "g"]], 4) == "routed_no_answer"
    assert classify("g", [[2, "g"]], None) == "routed_no_answer"          # subject's token unknown


def test_miss_split_counts_shares_and_examples():
    from lafn_lightning.evaluation.miss_report import format_markdown, miss_split

    records = [
        {"run": "multilingual", "group_id": "g", "cells": [
            _c("en", 1.0, 1.0, [[4, "g"]], 4),                    # a hit: not a miss
            _c("en", 0.5, 0.0, [], None, pred="a|b"),             # not routed
            _c("de", 0.5, 0.0, [[3, "h"]], 3, first=False),       # another group only, first token wrong
            _c("de", 1.0, 0.0, [[1, "g"]], 3),                    # F1 hit, EM miss, other token
            _c("de", 0.0, 0.0, [[3, "g"]], 3, first=False),       # routed, no answer, first token wrong
            _c("de", 0.0, 0.0, [[3, "g"]], 3, setting="edit_one_test_one"),   # another setting
            _c("de", 0.0, 0.0, [[3, "g"]], 3, metric="reliability"),          # another metric
            ["teacher_forced", "all_cached", "generality", "de", 0.0, 0.0, "old"],   # no sites recorded
        ]},
    ]
    split = miss_split(records, languages=["en", "de"])
    assert split["setting"] == "all_cached" and split["languages"] == ["en", "de"]
    f1, em = split["f1"], split["em"]
    assert f1["en"]["questions"] == 2 and f1["en"]["misses"] == 1 and f1["en"]["counts"]["not_routed"] == 1
    assert f1["de"]["questions"] == 4 and f1["de"]["misses"] == 2
    assert f1["de"]["counts"] == {"not_routed": 0, "other_group": 1, "other_token": 0, "routed_no_answer": 1}
    assert f1["de"]["shares"]["other_group"] == 0.5
    assert em["de"]["counts"] == {"not_routed": 0, "other_group": 1, "other_token": 1, "routed_no_answer": 1}
    assert f1["de"]["first_token"] == 2 and f1["en"]["first_token"] == 0 and em["de"]["first_token"] == 2
    assert f1["avg"]["misses"] == 3 and f1["avg"]["counts"]["not_routed"] == 1 and f1["avg"]["first_token"] == 2
    assert f1["avg"]["shares"]["not_routed"] == pytest.approx(0.5)             # (1.0 + 0.0) / 2 languages
    assert split["unrecorded"] == {"f1": 1, "em": 1}
    assert sorted(e["category"] for e in split["examples"]) == ["not_routed", "other_group", "routed_no_answer"]
    assert miss_split(records[:1], setting="edit_one_test_one")["f1"]["de"]["counts"]["routed_no_answer"] == 1
    md = format_markdown(split)
    assert "| en | 2 | 1 | 1 (100%) | 0 (0%) | 0 (0%) | 0 (0%) | 0 |" in md and "a\\|b" in md
    assert "| de | 4 | 2 | 0 (0%) | 1 (50%) | 0 (0%) | 1 (50%) | 2 |" in md
    # cross-lingual: a run's own language is left out, as in the results tables
    from lafn_lightning.evaluation.miss_report import include_for_mode

    cross = miss_split([{**records[0], "run": "de"}], include=include_for_mode("cross-lingual"))
    assert cross["languages"] == ["en"]
