"""Where each miss comes from: edit sites recorded per question by lafn evaluate, and the miss split."""
import json

import pytest
import torch
from torch import nn

from conftest import CONFIGS
from lafn_lightning.backbone.fingerprint import fingerprint
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.cache import CacheEntry, EditCache, write_shard
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
    groups = read_jsonl(write_groups(tmp / "g.jsonl"))
    model, tok = load_backbone("tiny-llama")
    layers = (1, 2)
    d_ff = model.config.intermediate_size
    entries = [CacheEntry(g.group_id, {lang: e.subject for lang, e in g.edits.items()}, layers,
                          torch.ones(len(layers), d_ff, dtype=torch.bool), torch.full((len(layers), d_ff), sign * 8.0))
               for g, sign in zip(groups, (1.0, -1.0))]
    write_shard(tmp / "cache", entries, fingerprint(model, layers))
    return groups, EditCache.open(tmp / "cache"), model, tok


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
    assert cell_sites(_cell(cells["moon"], "teacher_forced", "all_cached", "generality")) == ([], None)
