"""A cache you can trust (issue 32): no NaN served, no trained ΔV lost on a write error, verify that
means what it says, merge that never drops a fact, resume that repairs, and the smaller refusals."""
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import fit
from lafn_lightning.cache import CacheError, EditCache, merge_caches, write_shard
from lafn_lightning.cli import main
from lafn_lightning.routing.keys import KEYS_FILE, KeyStore
from test_cache import make_entry, make_fp

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def lafn(capsys, *argv, code=2):
    """Run ``lafn argv`` in-process, assert the exit status, return stdout and lafn's one stderr line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == code
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("lafn: ")]
    assert len(lines) <= 1, lines
    return out.out, "\n".join(lines)


def verify_ok(capsys, cache):
    """`lafn cache verify` exits 0 (main returns normally) and says ok."""
    main(["cache", "verify", str(cache)])
    assert capsys.readouterr().out.strip().endswith("ok")


@pytest.fixture
def no_backbone(monkeypatch):
    import lafn_lightning.editing.module as module

    def refuse(*a, **k):
        raise AssertionError("the backbone was loaded before the bad input was refused")

    monkeypatch.setattr(module, "load_backbone", refuse)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A tiny fit of 2 groups with router keys (read only: tests copy it)."""
    tmp = tmp_path_factory.mktemp("fitted")
    fit(tmp, "--data.groups", "0:2", "--trainer.max_steps", "2")
    return tmp / "cache"


def copy_of(cache: Path, tmp_path: Path, name: str = "c") -> Path:
    return Path(shutil.copytree(cache, tmp_path / name))


def poison(cache: Path, group_id: str, value: float = float("nan")) -> None:
    """Overwrite ``group_id``'s ΔV values with ``value`` and record the shard's new sha256, as a
    hostile or buggy writer would: only a content check can tell."""
    manifest = json.loads((cache / "manifest.json").read_text())
    rec = manifest["groups"][group_id]
    path = cache / rec["shard"]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[rec["keys"]["values"]] = torch.full_like(tensors[rec["keys"]["values"]], value)
    save_file(tensors, str(path), metadata=meta)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for r in manifest["groups"].values():
        if r["shard"] == rec["shard"]:
            r["sha256"] = sha
    (cache / "manifest.json").write_text(json.dumps(manifest))


# ---- 1. non-finite ΔV / router keys are refused on every read path, naming the group


def test_nan_delta_is_refused_on_every_read_path(fitted, tmp_path, capsys, monkeypatch):
    cache = copy_of(fitted, tmp_path)
    poison(cache, "mzsre:1")
    with pytest.raises(CacheError, match=r"group 'mzsre:1': non-finite ΔV"):
        EditCache.open(cache).entry("mzsre:1")
    EditCache.open(cache).entry("mzsre:0")   # the healthy group is still served

    out, _ = lafn(capsys, "cache", "verify", str(cache), code=1)
    assert out.splitlines() == [f"shard file {cache / EditCache.open(cache).info('mzsre:1')['shard']}, group 'mzsre:1': "
                                "non-finite ΔV values (NaN/Inf); delete the group (lafn cache delete) and edit it again",
                                "1 problem(s)"]

    _, err = lafn(capsys, "cache", "merge", str(tmp_path / "merged"), str(cache))
    assert err.startswith(f"lafn: error: merge: group 'mzsre:1' of {cache}: non-finite ΔV") and "nothing merged" in err
    assert not (tmp_path / "merged" / "manifest.json").exists()
    assert not list((tmp_path / "merged" / "shards").iterdir())   # the placed copy was taken back

    from lafn_lightning.inference.edited_model import EditedModel

    with pytest.raises(CacheError, match="mzsre:1"):
        EditedModel.from_cache(cache, groups=["mzsre:1"])

    monkeypatch.chdir(tmp_path)
    _, err = lafn(capsys, "evaluate", "-c", "tiny", "--cache_dir", str(cache), "--no_edit", "true", "--data.groups", "0:2",
                  "--output", str(tmp_path / "r.json"), "--generation", "false", *QUIET)
    assert "mzsre:1" in err and "non-finite" in err
    assert not (tmp_path / "r.json").exists()
    assert not (tmp_path / "r.progress.jsonl").exists()   # refused before any group was scored


def test_nan_router_key_is_refused_and_reported(fitted, tmp_path, capsys):
    cache = copy_of(fitted, tmp_path)
    path = cache / KEYS_FILE
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["k1"] = torch.full_like(tensors["k1"], float("inf"))
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="group 'mzsre:1' has non-finite keys"):
        KeyStore.load(path)
    out, _ = lafn(capsys, "cache", "verify", str(cache), code=1)
    assert "mzsre:1" in out and "non-finite keys" in out
    _, err = lafn(capsys, "cache", "merge", str(tmp_path / "merged"), str(cache))
    assert "non-finite keys" in err


# ---- 2. writability checked before the backbone loads; a write error keeps the trained ΔV


def test_unwritable_cache_dir_is_refused_before_the_backbone(tmp_path, capsys, monkeypatch, no_backbone):
    import tempfile

    real = tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if Path(dir).resolve() == (tmp_path / "ro").resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    _, err = lafn(capsys, "fit", "-c", "tiny", "--cache_dir", str(tmp_path / "ro" / "cache"), *QUIET)
    assert err == f"lafn: error: cache_dir {tmp_path / 'ro' / 'cache'}: cannot write in {tmp_path / 'ro'} (Read-only file system)"


def test_full_disk_is_refused_before_the_backbone(tmp_path, capsys, monkeypatch, no_backbone):
    import shutil as shutil_mod

    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(10**9, 10**9, 1000))
    _, err = lafn(capsys, "fit", "-c", "tiny", "--cache_dir", str(tmp_path / "cache"), *QUIET)
    assert "cache_dir" in err and "only 1,000 bytes free" in err


def test_output_that_cannot_be_written_is_refused_before_the_backbone(tmp_path, capsys, monkeypatch):
    import lafn_lightning.api.scoring as scoring

    monkeypatch.setattr(scoring, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    monkeypatch.setattr(scoring, "edit_dataset", lambda *a, **k: pytest.fail("edited before the check"))
    (tmp_path / "out").mkdir()
    _, err = lafn(capsys, "evaluate", "-c", "tiny", "--cache_dir", str(tmp_path / "c"), "--output", str(tmp_path / "out"),
                  *QUIET)
    assert err == f"lafn: error: --output {tmp_path / 'out'} is a directory; give a file path"


def test_a_write_error_is_one_line_naming_the_file(fitted, tmp_path, capsys, monkeypatch):
    """An OSError the preflight could not foresee (the disk fills during the evaluation) is one
    line naming the file, not a traceback."""
    import os

    real = os.replace

    def full(src, dst, *a, **k):
        if Path(dst).name == "r.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    monkeypatch.chdir(tmp_path)
    _, err = lafn(capsys, "evaluate", "-c", "tiny", "--cache_dir", str(fitted), "--no_edit", "true", "--data.groups", "0:1",
                  "--output", str(tmp_path / "r.json"), "--generation", "false", *QUIET)
    assert err == f"lafn: error: [Errno 28] No space left on device: '{tmp_path / 'r.json'}'"


def test_write_error_after_training_keeps_the_delta_and_says_where(tmp_path, capsys, monkeypatch):
    import lafn_lightning.cache.store as store

    real = store.atomic_write

    def full(path, data):
        if Path(path).suffix == ".safetensors" and Path(path).parent.name == "shards":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(store, "atomic_write", full)
    cache = tmp_path / "cache"
    _, err = lafn(capsys, "fit", "-c", "tiny", "--data.groups", "0:1", "--trainer.max_steps", "1", "--cache_dir", str(cache),
                  "--trainer.default_root_dir", str(tmp_path), *QUIET)
    assert err.startswith(f"lafn: error: cannot write {cache / 'shards'}") and "No space left on device" in err
    kept = Path(err.split("is kept in ")[1].split(" ")[0])
    assert kept.parent == tmp_path and kept.is_file()
    assert not list((cache / "shards").iterdir()) and not (cache / "manifest.json").exists()   # nothing half-written
    monkeypatch.setattr(store, "atomic_write", real)
    main(["cache", "import", str(kept), str(cache)])
    assert EditCache.open(cache).group_ids == ["mzsre:0"]
    capsys.readouterr()
    verify_ok(capsys, cache)


def test_overflowing_lr_names_the_cli_option_and_keeps_the_delta(tmp_path, capsys):
    cache = tmp_path / "cache"
    _, err = lafn(capsys, "fit", "-c", "tiny", "--data.groups", "0:1", "--trainer.max_steps", "1", "--model.lr", "1e30",
                  "--cache_dir", str(cache), "--trainer.default_root_dir", str(tmp_path), *QUIET)
    assert "overflows float16" in err and "--export.value_dtype bfloat16" in err and "torch.bfloat16" not in err
    kept = Path(err.split("is kept in ")[1].split(" ")[0])
    assert f"`lafn cache import {kept} {cache} --value_dtype bfloat16` adds it)" in err
    _, err = lafn(capsys, "cache", "import", str(kept), str(cache))   # float16 cannot hold it: says how to import
    assert err.startswith(f"lafn: error: {kept}: group 'mzsre:0': ΔV overflows float16 (max |value| ")
    assert err.endswith("); import it with --value_dtype bfloat16")
    main(["cache", "import", str(kept), str(cache), "--value_dtype", "bfloat16"])
    assert EditCache.open(cache).entry("mzsre:0").delta.abs().max() > 1e20


# ---- 3. one commit for shard, router keys and manifest; verify exits 0 after every operation


def test_verify_exits_0_after_fit_refit_delete_merge_and_gc(tmp_path, capsys):
    cache = tmp_path / "cache"
    fit(tmp_path, "--data.groups", "0:2", "--trainer.max_steps", "1")
    verify_ok(capsys, cache)
    fit(tmp_path, "--data.groups", "0:2", "--trainer.max_steps", "1")   # re-fit: both groups replaced
    verify_ok(capsys, cache)
    assert len(list((cache / "shards").iterdir())) == 1   # the replaced shard went in the same commit
    main(["cache", "delete", str(cache), "mzsre:1"])
    verify_ok(capsys, cache)
    assert KeyStore.load(cache / KEYS_FILE).group_ids() == ["mzsre:0"]
    main(["cache", "merge", str(tmp_path / "merged"), str(cache)])
    verify_ok(capsys, tmp_path / "merged")
    main(["cache", "gc", str(tmp_path / "merged")])
    assert "removed 0 file(s)" in capsys.readouterr().out
    verify_ok(capsys, tmp_path / "merged")


def test_a_failed_key_write_commits_nothing(tmp_path, capsys, monkeypatch):
    fit(tmp_path, "--data.groups", "0:1", "--trainer.max_steps", "1")
    cache = tmp_path / "cache"
    before = (cache / "manifest.json").read_bytes()

    def broken(self, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(KeyStore, "save", broken)
    with pytest.raises(CacheError, match=f"cannot write {cache / KEYS_FILE}: Input/output error.*is kept in"):
        fit(tmp_path, "--data.groups", "1:2", "--trainer.max_steps", "1")
    assert (cache / "manifest.json").read_bytes() == before   # mzsre:1 is not in the cache without its keys
    assert len(list((cache / "shards").iterdir())) == 1        # and its shard was taken back
    verify_ok(capsys, cache)


def test_verify_reports_missing_and_stale_router_keys_and_gc_prunes_stale(fitted, tmp_path, capsys):
    cache = copy_of(fitted, tmp_path)
    store = KeyStore.load(cache / KEYS_FILE)
    extra = KeyStore.load(cache / KEYS_FILE)
    extra.rename("mzsre:1", "ghost")                     # a crash after the key file, before the manifest
    KeyStore.merge([store, extra]).save(cache / KEYS_FILE)
    out, _ = lafn(capsys, "cache", "verify", str(cache), code=1)
    assert "holds keys of 1 group(s) not in the cache (['ghost']" in out
    main(["cache", "gc", str(cache)])
    capsys.readouterr()
    verify_ok(capsys, cache)
    store.remove("mzsre:1")
    store.save(cache / KEYS_FILE)                          # a damaged key file: a group lost its keys
    out, _ = lafn(capsys, "cache", "verify", str(cache), code=1)
    assert "has no keys for groups ['mzsre:1']" in out


# ---- 4. merge never silently drops a fact; JSONL ids carry a content hash


def test_merge_refuses_an_id_naming_different_facts_or_renames_it(tmp_path, capsys):
    fp = make_fp()
    a, b = make_entry("edits:0", seed=1), make_entry("edits:0", seed=2)
    b.subjects = {"en": "Another subject"}
    write_shard(tmp_path / "a", [a, make_entry("x", seed=3)], fp)
    write_shard(tmp_path / "b", [b], fp)
    _, err = lafn(capsys, "cache", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"))
    assert "group 'edits:0' names different facts" in err and "--rename" in err
    assert not (tmp_path / "m" / "manifest.json").exists()
    main(["cache", "merge", str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b"), "--rename"])
    m = EditCache.open(tmp_path / "m")
    renamed = [g for g in m.group_ids if g.startswith("edits:0#")]
    assert len(m) == 3 and len(renamed) == 1 and m.subjects(renamed[0]) == {"en": "Another subject"}
    assert m.subjects("edits:0") == a.subjects
    capsys.readouterr()
    verify_ok(capsys, tmp_path / "m")
    # the same fact in two caches: the later one wins, as before
    merge_caches(tmp_path / "m2", [tmp_path / "a", tmp_path / "a"])


def test_merge_unites_skipped_records(tmp_path):
    from lafn_lightning.cache import set_skipped

    fp = make_fp()
    write_shard(tmp_path / "a", [make_entry("g1")], fp)
    write_shard(tmp_path / "b", [make_entry("g2")], fp)
    set_skipped(tmp_path / "a", {"g9": "a reason", "g2": "skipped in a, edited in b"})
    set_skipped(tmp_path / "b", {"g8": "another reason"})
    m = merge_caches(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert m.skipped == {"g9": "a reason", "g8": "another reason"} and m.verify() == []


def test_jsonl_ids_without_id_carry_a_content_hash(tmp_path):
    from lafn_lightning.data import read_jsonl

    def one(subject):
        return {"edits": {"en": {"subject": subject, "prompt": f"Where is {subject}?", "target": "Rome"}}}

    for d, subject in (("x", "Gustave Tower"), ("y", "Apollo Base")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "edits.jsonl").write_text(json.dumps(one(subject)) + "\n")
    gx = read_jsonl(tmp_path / "x" / "edits.jsonl")[0].group_id
    gy = read_jsonl(tmp_path / "y" / "edits.jsonl")[0].group_id
    assert gx.startswith("edits:0:") and gy.startswith("edits:0:") and gx != gy
    assert read_jsonl(tmp_path / "x" / "edits.jsonl")[0].group_id == gx   # stable


# ---- 5. a resumed edit-dataset repairs a group whose shard is missing or unreadable


def test_edit_dataset_re_edits_a_group_whose_shard_is_missing(tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["edit-dataset", "-c", "tiny", "--data.groups", "0:2", "--edit_batch_size", "1", "--trainer.max_steps", "1",
              "--cache_dir", str(cache), "--trainer.default_root_dir", str(tmp_path), *QUIET]
    main(common)
    lost = cache / EditCache.open(cache).info("mzsre:1")["shard"]
    lost.unlink()
    capsys.readouterr()
    main(common)
    err = capsys.readouterr().err
    assert "1 already in" in err and "1 to edit" in err
    c = EditCache.open(cache)
    c.entry("mzsre:1")
    verify_ok(capsys, cache)


# ---- 6. the smaller refusals


def test_empty_layers_is_one_line_before_the_backbone(tmp_path, capsys, no_backbone):
    _, err = lafn(capsys, "fit", "-c", "tiny", "--model.layers", "[]", "--cache_dir", str(tmp_path / "c"), *QUIET)
    assert err == "lafn: error: model.layers: empty list; give the decoder layers to edit, e.g. [1, 2]"


def test_mzsre_file_with_a_custom_name_is_read_as_mzsre(tmp_path, dev_data):
    from lafn_lightning.data import load_groups

    custom = tmp_path / "my_german_edits.json"
    shutil.copy(dev_data / "mzsre_test_duplicate_ende.json", custom)
    groups = load_groups(custom, select="0:2")
    assert [g.group_id for g in groups] == ["mzsre:0", "mzsre:1"] and groups[0].languages == ("en", "de")
    chinese = tmp_path / "my_chinese_edits.json"        # English-Chinese: MzsRE's blocks lack zsRE's pred/answers/cond
    shutil.copy(dev_data / "mzsre_test_duplicate_enzh.json", chinese)
    assert [g.group_id for g in load_groups(chinese, select="0:2")] == ["mzsre:0", "mzsre:1"]
    bizsre = tmp_path / "my_bilingual_edits.json"      # Bi-ZsRE under another name stays Bi-ZsRE
    shutil.copy(Path(__file__).parent / "fixtures" / "bizsre_test.json", bizsre)
    assert [g.group_id for g in load_groups(bizsre, select="0:2")] == ["bizsre:0", "bizsre:1"]


def test_prompt_beyond_the_context_is_refused_before_training(tmp_path, capsys):
    long = "Where is Gustave Tower, " + "which is very, " * 400 + "located?"
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"id": "long", "edits": {"en": {"subject": "Gustave Tower", "prompt": long,
                                                               "target": "Paris"}}}) + "\n")
    _, err = lafn(capsys, "fit", "-c", "tiny", "--data.dataset", str(data), "--data.languages", "[en]", "--data.groups", "null",
                  "--cache_dir", str(tmp_path / "c"), *QUIET)
    assert err.startswith("lafn: error: long.jsonl: record 0 (long), field 'en.prompt':") and "context of 512" in err
    assert not (tmp_path / "c" / "manifest.json").exists()
