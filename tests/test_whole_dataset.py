"""Whole-dataset runs: real records are never refused wholesale (skipped with their reason, listed in
the cache and the results), Han single-character subjects are names, upstream-size files read."""
import json
import shutil

import pytest

from lafn_lightning.cache import EditCache
from lafn_lightning.cli import main
from lafn_lightning.data.selection import select

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _mzsre_dir(dev_data, tmp_path, n=3, change=None, repeat=1):
    """An upstream-layout MzsRE folder with every pair file of the shipped records ``0:n`` (repeated
    ``repeat`` times, as the 743-record upstream files); ``change(lang, record)`` edits a record."""
    out = tmp_path / "mzsre"
    out.mkdir()
    for src in sorted(dev_data.glob("mzsre_test_duplicate_en*.json")):
        lang = src.stem.rsplit("_en", 1)[1]
        records = json.loads(src.read_text(encoding="utf-8"))[:n] * repeat
        records = json.loads(json.dumps(records))  # copies
        for i, r in enumerate(records):
            if change:
                change(lang, i, r)
        (out / src.name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


def _han_subject(lang, i, record):
    """Record 1's Chinese subject becomes the one-character element name 钫 (francium)."""
    if lang == "zh" and i == 1:
        record["zh"]["subject"] = "钫"
        record["zh"]["src"] = "钫的原子序数是多少？"


def _degenerate_subject(lang, i, record):
    """Record 2's subject is a lone question mark in every pair file (its English block is shared)."""
    if i == 2:
        for side in ("en", lang):
            record[side]["subject"] = "?"


def test_a_han_single_character_subject_is_a_name(dev_data, tmp_path):
    sel = select(str(_mzsre_dir(dev_data, tmp_path, change=_han_subject)), languages=["en", "zh"], groups=None)
    assert [g.group_id for g in sel.groups] == ["mzsre:0", "mzsre:1", "mzsre:2"] and sel.skipped == {}
    assert sel.groups[1].edits["zh"].subject == "钫"


@pytest.mark.parametrize("subject, kept", [("京", True), ("ア", True), ("한", True), ("x", False), ("ก", False)])
def test_which_single_characters_are_names(subject, kept):
    from lafn_lightning.data.selection import subject_problem

    assert (subject_problem(subject) is None) is kept


def test_a_degenerate_record_is_skipped_and_the_run_goes_on(dev_data, tmp_path, capsys):
    data = _mzsre_dir(dev_data, tmp_path, change=lambda l, i, r: (_han_subject(l, i, r), _degenerate_subject(l, i, r)))
    cache = tmp_path / "cache"
    common = ["-c", "tiny", "--data.dataset", str(data), "--data.groups", "null", "--cache_dir", str(cache),
              "--trainer.max_steps", "2", *QUIET]
    main(["edit-dataset", *common, "--edit_batch_size", "2"])
    err = capsys.readouterr().err
    assert "[lafn] skipped: mzsre: record 2, field 'en.subject': subject '?'" in err
    assert "1 skipped" in err
    edited = EditCache.open(cache)
    assert edited.group_ids == ["mzsre:0", "mzsre:1"]                 # the 钫 record is edited like any other
    assert edited.subjects("mzsre:1")["zh"] == "钫"
    assert list(edited.skipped) == ["mzsre:2"] and "no letter or digit" in edited.skipped["mzsre:2"]
    assert edited.stats()["skipped"] == 1

    out = tmp_path / "r.json"
    main(["evaluate", *common, "--no_edit", "true", "--output", str(out), "--generation", "false"])
    results = json.loads(out.read_text())
    assert list(results["meta"]["skipped_records"]) == ["mzsre:2"]
    assert results["meta"]["runs"]["multilingual"]["groups_evaluated"] == 2
    assert "## Skipped records (1)" in out.with_suffix(".md").read_text() and "`mzsre:2`" in out.with_suffix(".md").read_text()


def test_strict_stops_at_the_first_bad_record_before_any_edit(dev_data, tmp_path, capsys):
    data = _mzsre_dir(dev_data, tmp_path, change=_degenerate_subject)
    with pytest.raises(SystemExit) as exit_:
        main(["edit-dataset", "-c", "tiny", "--data.dataset", str(data), "--data.groups", "null", "--data.strict", "true",
              "--cache_dir", str(tmp_path / "cache"), *QUIET])
    assert exit_.value.code == 2
    assert "record 2, field 'en.subject'" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_a_record_edited_later_leaves_the_skipped_list(tmp_path):
    from lafn_lightning.cache import set_skipped, write_shard

    from test_cache import make_entry, make_fp

    cache = tmp_path / "c"
    write_shard(cache, [make_entry("g:1"), make_entry("g:2", seed=1)], make_fp())
    set_skipped(cache, {"g:9": "why", "g:8": "why"})
    set_skipped(cache, {}, done=["g:9"])
    assert EditCache.open(cache).skipped == {"g:8": "why"}


def test_upstream_size_files_read_unchanged(dev_data, tmp_path):
    """All 743 records of each of the 11 upstream pair files, as the full MzsRE test set has them."""
    data = _mzsre_dir(dev_data, tmp_path, n=150, repeat=5)
    for f in data.glob("*.json"):
        records = json.loads(f.read_text(encoding="utf-8"))[:743]
        f.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    sel = select(str(data), languages=None, groups=None, check=False)
    assert len(sel.groups) == 743 and len(sel.groups[0].languages) == 12
    shutil.rmtree(data)
