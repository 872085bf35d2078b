"""lafn compare: two evaluations of the same groups, per-language differences and a paired bootstrap interval."""
import json

import pytest
import torch

from lafn_lightning.api.analysis import compare
from lafn_lightning.cli import main
from lafn_lightning.evaluation.compare import compare_runs, format_markdown
from lafn_lightning.evaluation.protocol import aggregate

LANGS = ["en", "zh"]


def _records(scores: dict[str, dict[str, tuple[float, float]]], extra_setting: bool = True) -> list[dict]:
    """Progress records: {group: {language: (f1, em)}} as generality cells (plus a reliability and a
    pre-edit cell per language that a generality comparison must not read)."""
    out = []
    for gid, per_lang in scores.items():
        cells = []
        for lang, (f1, em) in per_lang.items():
            cells.append(["teacher_forced", "all_cached", "generality", lang, f1, em, "x"])
            cells.append(["teacher_forced", "all_cached", "reliability", lang, 0.0, 0.0, "x"])
            if extra_setting:
                cells.append(["teacher_forced", "pre_edit", "generality", lang, 1.0 - f1, 0.0, "x"])
        out.append({"run": "multilingual", "group_id": gid, "cells": cells})
    return out


BASE = {"g0": {"en": (1.0, 1.0), "zh": (0.5, 0.0)},
        "g1": {"en": (0.8, 0.0), "zh": (1.0, 1.0)},
        "g2": {"en": (1.0, 1.0), "zh": (0.25, 0.0)}}
OTHER = {"g0": {"en": (1.0, 1.0), "zh": (1.0, 1.0)},
         "g1": {"en": (0.6, 0.0), "zh": (1.0, 1.0)},
         "g2": {"en": (1.0, 1.0), "zh": (0.75, 0.0)},
         "g9": {"en": (0.0, 0.0), "zh": (0.0, 0.0)}}          # not in BASE: left out


def test_scores_are_lafn_evaluates_on_the_shared_groups_and_their_difference():
    result = compare_runs(_records(BASE), _records(OTHER), languages=LANGS, resamples=0)
    shared = [r for r in _records(OTHER) if r["group_id"] != "g9"]
    expected_other = aggregate(shared, LANGS)["teacher_forced"]["all_cached"]["generality"]
    expected_base = aggregate(_records(BASE), LANGS)["teacher_forced"]["all_cached"]["generality"]
    for lang in [*LANGS, "avg"]:
        for score in ("f1", "em"):
            assert result["other"][lang][score] == pytest.approx(expected_other[lang][score])
            assert result["base"][lang][score] == pytest.approx(expected_base[lang][score])
            assert result["delta"][lang][score] == pytest.approx(expected_other[lang][score] - expected_base[lang][score])
    assert result["groups"] == 3 and result["only_other"] == ["g9"] and result["only_base"] == []
    # by hand: zh F1 0.5833 -> 0.9167, en F1 0.9333 -> 0.8667
    assert result["delta"]["zh"]["f1"] == pytest.approx(100 / 3)
    assert result["delta"]["en"]["f1"] == pytest.approx(-20 / 3)
    assert result["interval"] is None


def test_the_interval_resamples_whole_groups():
    # every group gains exactly 10 F1 in both languages: every resample gives +10
    base = {f"g{i}": {"en": (0.5, 0.0), "zh": (0.2 + 0.1 * i, 0.0)} for i in range(5)}
    other = {g: {lang: (f1 + 0.1, em) for lang, (f1, em) in d.items()} for g, d in base.items()}
    iv = compare_runs(_records(base), _records(other), languages=LANGS, resamples=500)["interval"]
    assert iv["f1"] == pytest.approx([10.0, 10.0]) and iv["em"] == pytest.approx([0.0, 0.0])
    # one group gains 60 in zh, the others nothing: the interval reaches from 0 to well above the mean (+6)
    other = dict(base, g0={"en": (0.5, 0.0), "zh": (0.8, 1.0)})
    result = compare_runs(_records(base), _records(other), languages=LANGS, resamples=2000, seed=1)
    lo, hi = result["interval"]["f1"]
    assert result["delta"]["avg"]["f1"] == pytest.approx(6.0)
    assert lo == pytest.approx(0.0) and 12.0 <= hi <= 30.0
    # a resample is a multiset of groups: compare with drawing the groups directly
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(5, (2000, 5), generator=gen)
    direct = (idx == 0).sum(1).double() * 60 / 5 / 2          # g0's zh gain, averaged over groups, then languages
    assert hi == pytest.approx(float(torch.quantile(direct, 0.975)))


def test_no_shared_group_is_refused():
    with pytest.raises(ValueError, match="no group has generality"):
        compare_runs(_records({"a": BASE["g0"]}), _records({"b": BASE["g0"]}), languages=LANGS)


def test_markdown_names_both_runs_and_the_left_out_groups():
    text = format_markdown(compare_runs(_records(BASE), _records(OTHER), languages=LANGS, resamples=200),
                           names=("preset", "lever"))
    assert "| zh | 58.3 | 91.7 | +33.3 |" in text
    assert "preset F1 | lever F1" in text and "1 group(s) only in lever, left out: g9." in text
    assert "paired bootstrap interval over the 3 groups" in text


def _write(path, records, mode="multilingual"):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"header": {"version": 1, "mode": mode, "languages": LANGS}}
    lines = [json.dumps(header)] + [json.dumps(r) for r in records]
    path.with_name("results.progress.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_command_line(tmp_path, capsys):
    base = _write(tmp_path / "preset" / "results.json", _records(BASE))
    other = _write(tmp_path / "lever" / "results.json", _records(OTHER))
    main(["compare", base, other, "--resamples", "100", "--output", str(tmp_path / "cmp.md")])
    out = capsys.readouterr().out
    assert "## Generality: lever against preset (all_cached, teacher_forced, 3 groups)" in out
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert data["delta"]["zh"]["f1"] == pytest.approx(100 / 3) and (tmp_path / "cmp.md").read_text() == out.rstrip("\n") + "\n"
    main(["compare", base, other, "--metric", "reliability", "--resamples", "0"])
    assert "| Avg | 0.0 | 0.0 | +0.0 |" in capsys.readouterr().out


def test_command_line_refuses_bad_input(tmp_path, capsys):
    base = _write(tmp_path / "a" / "results.json", _records(BASE))
    other = _write(tmp_path / "b" / "results.json", _records(OTHER), mode="monolingual")
    for argv, message in (([base, other], "compare evaluations of one mode"),
                          ([base, str(tmp_path / "none.json")], "no progress file"),
                          ([base, base, "--metric", "fluency"], "metric='fluency'"),
                          ([base, base, "--resamples", "-1"], "resamples=-1")):
        with pytest.raises(SystemExit) as exit_:
            main(["compare", *argv])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_a_side_evaluated_in_parts(tmp_path, capsys):
    base = _write(tmp_path / "preset" / "results.json", _records(BASE))
    first = _write(tmp_path / "lever_a" / "results.json", _records({g: OTHER[g] for g in ("g0", "g1")}))
    second = _write(tmp_path / "lever_b" / "results.json", _records({"g2": OTHER["g2"]}))
    whole = compare_runs(_records(BASE), _records(OTHER), languages=LANGS, resamples=0)
    result = compare(base, f"{first},{second}", resamples=0)
    assert result["groups"] == 3 and result["delta"] == whole["delta"]
    assert "lever_a+ against preset" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", base, f"{first},{first}"])
    assert "both score group g0" in capsys.readouterr().err
