"""Failure behaviour: bad input refused in one line before compute, signals, hostile caches, `lafn cache`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, fit
from lafn_lightning.cache import CacheError, EditCache
from lafn_lightning.cli import main

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def lafn(capsys, *argv, code=2):
    """Run ``lafn argv`` in-process; assert the exit status; return lafn's own stderr lines (one for
    an error: main caught it, so no traceback reached the user)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lafn: ")]
    assert len(lines) <= 1, lines
    return "\n".join(lines)


@pytest.fixture
def no_backbone(monkeypatch):
    """Fail loudly if the backbone is ever loaded: bad input must be refused first."""
    import lafn_lightning.editing.module as module

    def refuse(*a, **k):
        raise AssertionError("the backbone was loaded before the bad input was refused")

    monkeypatch.setattr(module, "load_backbone", refuse)


def test_user_error_is_one_line_exit_2_and_lafn_debug_shows_the_traceback(capsys, monkeypatch, no_backbone, tmp_path):
    err = lafn(capsys, "fit", "-c", "tiny", "--trainer.max_steps", "0", "--cache_dir", str(tmp_path / "c"))
    assert err.startswith("lafn: error: trainer.max_steps=0")
    monkeypatch.setenv("LAFN_DEBUG", "1")
    with pytest.raises(ValueError, match="trainer.max_steps=0"):
        main(["fit", "-c", "tiny", "--trainer.max_steps", "0", "--cache_dir", str(tmp_path / "c")])


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _edit(subject, prompt="Where is {} located?", target="Paris"):
    return {"subject": subject, "prompt": prompt.format(subject), "target": target}


@pytest.mark.parametrize("case, expected", [
    ("corrupt_manifest", "manifest c/manifest.json is corrupt"),
    ("cache_is_a_file", "exists and is not a directory"),
    ("empty_languages", "data.languages: empty list"),
    ("mixed_languages", "record 1, field 'edits': languages ['de', 'en'] differ from record 0's ['en', 'zh']"),
    ("one_letter_subject", "field 'en.subject': subject 'a' has a single letter or digit"),
    ("invisible_subject", "has no letter or digit"),
    ("common_subject", "occurs in"),
    ("bad_checkpoint", "not a checkpoint that can be loaded safely"),
    ("missing_checkpoint", "no such checkpoint file"),
])
def test_bad_input_is_refused_before_the_backbone_is_loaded(case, expected, tmp_path, monkeypatch, capsys, no_backbone):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", "tiny", "--cache_dir", "c", *QUIET]
    if case == "corrupt_manifest":
        (tmp_path / "c").mkdir()
        (tmp_path / "c/manifest.json").write_text("{not json")
    elif case == "cache_is_a_file":
        (tmp_path / "c").write_text("x")
    elif case == "empty_languages":
        args += ["--data.languages", "[]"]
    elif case == "mixed_languages":
        _jsonl(tmp_path / "d.jsonl", [{"edits": {"en": _edit("Gustave Tower"), "zh": _edit("古斯塔夫塔")}},
                                      {"edits": {"en": _edit("Apollo Base"), "de": _edit("Apollo-Basis")}}])
        args += ["--data.dataset", "d.jsonl", "--data.languages", "null", "--data.groups", "null"]
    elif case in ("one_letter_subject", "invisible_subject", "common_subject"):
        subject = {"one_letter_subject": "a", "invisible_subject": "\u200b", "common_subject": "What"}[case]
        _jsonl(tmp_path / "d.jsonl", [{"edits": {"en": _edit(subject, "{} is the capital of?")}}])
        args += ["--data.dataset", "d.jsonl", "--data.languages", "null", "--data.groups", "null"]
    elif case == "bad_checkpoint":
        (tmp_path / "x.ckpt").write_bytes(b"\x80\x04not a checkpoint")
        args += ["--ckpt_path", "x.ckpt"]
    elif case == "missing_checkpoint":
        args += ["--ckpt_path", "nowhere.ckpt"]
    err = lafn(capsys, *args)
    assert expected in err, err


def test_an_unmatchable_subject_can_be_allowed_explicitly(tmp_path):
    from lafn_lightning.data.selection import select_groups

    path = _jsonl(tmp_path / "d.jsonl", [{"edits": {"en": _edit("What", "{} is the capital of?")}}])
    with pytest.raises(ValueError, match="occurs in"):
        select_groups(str(path), languages=None, groups=None)
    assert select_groups(str(path), languages=None, groups=None, check=False)[0].edits["en"].subject == "What"


def test_no_real_mzsre_subject_is_refused():
    from lafn_lightning.data.selection import select_groups

    assert len(select_groups(None, languages=None, groups=None)) == 150  # all 150 dev groups, 12 languages


def test_cache_of_another_backbone_is_refused_before_training(tmp_path, monkeypatch):
    fit(tmp_path, "--trainer.max_steps", "1", "--data.groups", "0:1")
    before = (tmp_path / "cache/manifest.json").read_bytes()
    from lafn_lightning.editing.module import LafnEditModule

    steps = []
    real = LafnEditModule.training_step
    monkeypatch.setattr(LafnEditModule, "training_step", lambda self, *a: (steps.append(1), real(self, *a))[1])
    with pytest.raises(CacheError, match="backbone: cache has .tiny-llama., given .tiny-qwen2."):
        fit(tmp_path, "--trainer.max_steps", "1", "--data.groups", "1:2", "--model.backbone", "tiny-qwen2")
    assert steps == [] and (tmp_path / "cache/manifest.json").read_bytes() == before


def test_evaluate_no_edit_needs_an_existing_cache(tmp_path, capsys):
    err = lafn(capsys, "evaluate", "-c", "tiny", "--cache_dir", str(tmp_path / "none"), "--no_edit", "true",
               "--output", str(tmp_path / "r.json"), *QUIET)
    assert "no edit cache at" in err and not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------ lafn cache


def test_every_cache_subcommand(tmp_path, capsys):
    fit(tmp_path / "a", "--trainer.max_steps", "1", "--data.groups", "0:2")
    fit(tmp_path / "b", "--trainer.max_steps", "1", "--data.groups", "2:3")
    a, b = str(tmp_path / "a/cache"), str(tmp_path / "b/cache")
    main(["cache", "list", a])
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["mzsre:0", "mzsre:1"]
    main(["cache", "show", a, "mzsre:1"])
    assert json.loads(capsys.readouterr().out)["subjects"]["en"] == "Ramalinaceae"
    assert "no group 'nope'" in lafn(capsys, "cache", "show", a, "nope")
    assert "nothing deleted" in lafn(capsys, "cache", "delete", a, "mzsre:0", "nope")
    assert EditCache.open(a).group_ids == ["mzsre:0", "mzsre:1"]
    main(["cache", "merge", str(tmp_path / "m"), a, b])
    assert "3 groups" in capsys.readouterr().out
    main(["cache", "delete", str(tmp_path / "m"), "mzsre:0"])
    capsys.readouterr()
    assert sorted(EditCache.open(tmp_path / "m").group_ids) == ["mzsre:1", "mzsre:2"]
    orphan = tmp_path / "m/shards/orphan.safetensors"
    orphan.write_bytes((tmp_path / "m/shards" / sorted(os.listdir(tmp_path / "m/shards"))[0]).read_bytes())
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", str(tmp_path / "m")])
    assert exit_.value.code == 1 and "orphan shard file" in capsys.readouterr().out
    main(["cache", "gc", str(tmp_path / "m"), "--dry_run"])
    assert "would remove 1 file" in capsys.readouterr().out and orphan.exists()
    main(["cache", "gc", str(tmp_path / "m")])
    assert "removed 1 file" in capsys.readouterr().out and not orphan.exists()
    main(["cache", "verify", str(tmp_path / "m")])
    assert capsys.readouterr().out.strip() == "ok"
    main(["cache", "stats", str(tmp_path / "m")])
    assert json.loads(capsys.readouterr().out)["groups"] == 2


def test_links_in_a_cache_are_never_followed(tmp_path, capsys):
    fit(tmp_path, "--trainer.max_steps", "1", "--data.groups", "0:1")
    cache = tmp_path / "cache"
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.safetensors"
    victim.write_bytes(b"do not delete")
    # shards/ replaced by a link to a directory outside: gc and verify refuse, nothing is deleted
    (cache / "shards").rename(tmp_path / "real_shards")
    (cache / "shards").symlink_to(outside, target_is_directory=True)
    assert "symbolic link" in lafn(capsys, "cache", "gc", str(cache))
    assert "symbolic link" in lafn(capsys, "cache", "verify", str(cache))
    with pytest.raises(CacheError, match="symbolic link"):
        fit(tmp_path, "--trainer.max_steps", "1", "--data.groups", "1:2")
    assert victim.read_bytes() == b"do not delete"
    (cache / "shards").unlink()
    (tmp_path / "real_shards").rename(cache / "shards")
    # a shard file replaced by a link: reading, merging and gc refuse it and leave the target alone
    shard = next((cache / "shards").iterdir())
    shard.rename(outside / "moved.safetensors")
    shard.symlink_to(outside / "moved.safetensors")
    opened = EditCache.open(cache)
    with pytest.raises(CacheError, match="missing or not a regular file"):
        opened.entry("mzsre:0")
    assert any("symbolic link" in p for p in opened.verify())
    assert "not a regular file" in lafn(capsys, "cache", "merge", str(tmp_path / "dest"), str(cache))
    main(["cache", "gc", str(cache)])
    assert (outside / "moved.safetensors").exists()
    # the lock file replaced by a link: verify creates nothing at its target
    shard.unlink()
    (outside / "moved.safetensors").rename(shard)
    (cache / ".lock").unlink()
    (cache / ".lock").symlink_to(outside / "lock-target")
    err = lafn(capsys, "cache", "verify", str(cache), code=2)
    assert "symbolic link" in err and not (outside / "lock-target").exists()


# --------------------------------------------------------------------------------------- signals


def _start(tmp_path, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lafn_lightning.cli", argv[0], "-c", str(CONFIGS / "tiny.yaml"),
                             *argv[1:], "--cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path),
                             "--progress.every_n_seconds", "0", *QUIET],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)


def _wait_for(proc, text, timeout=600):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {text!r}: {''.join(seen)[-2000:]}")


def _finish(proc):
    rest = proc.stderr.read()
    return proc.wait(timeout=600), rest


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_fit_exits_nonzero_and_leaves_the_cache_as_it_was(tmp_path, sig, code, word, monkeypatch):
    from lafn_lightning.editing.module import LafnEditModule

    real = LafnEditModule.losses
    monkeypatch.setattr(LafnEditModule, "losses", lambda self, *a: {**(out := real(self, *a)), "target": out["target"] * 0})
    # a cache made with the same settings (its group "converged" at once, so this takes a second)
    fit(tmp_path, "--trainer.max_steps", "400", "--data.groups", "0:1", "--model.stop_loss", "1e-9")
    monkeypatch.undo()
    assert EditCache.open(tmp_path / "cache").group_ids == ["mzsre:0"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    proc = _start(tmp_path, "fit", "--data.groups", "1:3", "--trainer.max_steps", "400", "--model.stop_loss", "1e-9")
    _wait_for(proc, "[lafn] step 2/400")
    proc.send_signal(sig)
    status, rest = _finish(proc)
    assert status == code and f"lafn: {word}" in rest, rest[-2000:]
    after = {p.name: p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert after == before


def test_edit_dataset_interrupted_keeps_finished_batches_and_resumes(tmp_path):
    args = ("edit-dataset", "--data.groups", "0:4", "--edit_batch_size", "2", "--trainer.max_steps", "3")
    proc = _start(tmp_path, *args)
    _wait_for(proc, "edit batch 1/2 done")
    proc.send_signal(signal.SIGTERM)
    status, _ = _finish(proc)
    assert status == 143
    assert sorted(EditCache.open(tmp_path / "cache").group_ids) == ["mzsre:0", "mzsre:1"]
    proc = _start(tmp_path, *args)
    seen = _wait_for(proc, "already in")
    status, _ = _finish(proc)
    assert status == 0 and "2 already in" in seen[-1]
    assert sorted(EditCache.open(tmp_path / "cache").group_ids) == [f"mzsre:{i}" for i in range(4)]


def test_two_fits_write_one_cache_at_once(tmp_path):
    procs = [_start(tmp_path, "fit", "--data.groups", groups, "--trainer.max_steps", "2") for groups in ("0:2", "2:4")]
    results = [_finish(p) for p in procs]
    assert [status for status, _ in results] == [0, 0], [rest[-1500:] for _, rest in results]
    cache = EditCache.open(tmp_path / "cache")
    assert sorted(cache.group_ids) == [f"mzsre:{i}" for i in range(4)] and cache.verify() == []
