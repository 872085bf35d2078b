"""Tests for the edit cache (lafn_lightning.cache): format, atomicity, locking, merging."""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import lafn_lightning.cache as cache_mod
from lafn_lightning.cache import (
    MANIFEST_NAME,
    CacheEntry,
    CacheError,
    EditCache,
    FingerprintMismatch,
    merge_caches,
    pack_mask,
    unpack_mask,
    write_shard,
)

LAYERS = (1, 2, 3, 5)


def make_fp(d_ff: int = 64, layers=LAYERS, **over) -> dict:
    fp = {
        "name": "tiny-llama",
        "n_layers": 6,
        "d_ff": d_ff,
        "dtype": "float32",
        "layers_hash": "ab" * 32,
        "edited_layers": list(layers),
    }
    fp.update(over)
    return fp


def make_entry(gid: str, d_ff: int = 64, layers=LAYERS, density: float = 0.3, seed: int = 0, scale: float = 1.0) -> CacheEntry:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(layers), d_ff, generator=g) < density
    # garbage off the mask: must not be stored
    delta = torch.randn(len(layers), d_ff, generator=g) * scale
    return CacheEntry(
        group_id=gid,
        subjects={"en": f"Subject {gid}", "de": f"Subjekt {gid}", "fr": f"Subject {gid}"},
        layers=tuple(layers),
        mask=mask,
        delta=delta,
        meta={"steps": 25, "final_loss": 0.125, "located": mask.sum(1).tolist(), "nan_loss": float("nan")},
    )


def assert_matches(loaded: CacheEntry, orig: CacheEntry, atol: float = 2e-3, rtol: float = 1e-3) -> None:
    assert loaded.group_id == orig.group_id
    assert loaded.subjects == orig.subjects
    assert loaded.layers == tuple(orig.layers)
    assert loaded.mask.dtype == torch.bool
    assert torch.equal(loaded.mask, orig.mask)
    assert torch.allclose(loaded.delta[orig.mask], orig.delta[orig.mask].to(loaded.delta.dtype), atol=atol, rtol=rtol)
    assert torch.count_nonzero(loaded.delta[~orig.mask]) == 0


def shard_files(d: Path) -> list[Path]:
    return sorted((d / "shards").glob("*.safetensors"))


# --------------------------------------------------------------------------------------------


def test_pack_mask_matches_numpy_packbits():
    for d in (1, 7, 8, 13, 2048, 14336):
        m = torch.rand(3, d, generator=torch.Generator().manual_seed(d)) < 0.3
        packed = pack_mask(m)
        assert packed.dtype == torch.uint8 and packed.shape == (3, (d + 7) // 8)
        np.testing.assert_array_equal(packed.numpy(), np.packbits(m.numpy(), axis=-1))
        assert torch.equal(unpack_mask(packed, d), m)
    bad = pack_mask(torch.ones(1, 13, dtype=torch.bool))
    bad[0, -1] |= 1  # a padding bit
    with pytest.raises(ValueError, match="padding"):
        unpack_mask(bad, 13)


def test_round_trip(tmp_path):
    fp = make_fp()
    entries = [make_entry(f"g{i}", seed=i) for i in range(3)]
    entries.append(make_entry("empty", density=0.0, seed=9))  # nothing located: still round-trips
    shard = write_shard(tmp_path, entries, fp, shard_name="fit0")
    assert shard == tmp_path / "shards" / "fit0.safetensors" and shard.is_file()

    c = EditCache.open(tmp_path, fp)
    assert c.group_ids == ["g0", "g1", "g2", "empty"]
    assert len(c) == 4 and "g1" in c and "nope" not in c
    assert c.fingerprint == fp
    assert c.subjects("g0") == entries[0].subjects
    # distinct subjects, first-seen order (en and fr share a string)
    assert c.all_subjects()["g2"] == ["Subject g2", "Subjekt g2"]
    for e in entries:
        got = c.entry(e.group_id)
        assert got.delta.dtype == torch.float32 and got.delta.device.type == "cpu"
        assert_matches(got, e)
    meta = c.entry("g1").meta
    assert meta["steps"] == 25 and meta["final_loss"] == 0.125 and meta["nan_loss"] is None
    assert meta["located"] == entries[1].mask.sum(1).tolist()
    assert c.info("g1")["located"] == entries[1].mask.sum(1).tolist()
    assert c.entry("g0", device="cpu", dtype=torch.bfloat16).delta.dtype == torch.bfloat16
    assert torch.count_nonzero(c.entry("empty").delta) == 0
    with pytest.raises(KeyError, match="nope"):
        c.entry("nope")
    assert c.verify() == []


def test_manifest_text_unicode_ids_and_empty_cache(tmp_path):
    fp = make_fp()
    e = make_entry("zsre/17 ü \"quoted\"", seed=3)
    e.subjects = {"zh": "北京", "ar": "بكين", "en": "Beijing"}
    write_shard(tmp_path, [e], fp)
    text = (tmp_path / MANIFEST_NAME).read_text(encoding="utf-8")
    assert "北京" in text  # stored as UTF-8, readable
    assert len(text.split("\n")) == 10  # braces, one line per field (settings included) and per group, final newline
    c = EditCache.open(tmp_path)
    assert c.subjects(e.group_id) == e.subjects
    assert_matches(c.entry(e.group_id), e)
    c.delete(e.group_id)
    c = EditCache.open(tmp_path)
    assert len(c) == 0 and c.group_ids == [] and c.all_subjects() == {}
    assert c.stats()["groups"] == 0 and c.stats()["bytes_per_edit"] == 0.0


def test_value_dtypes_and_validation(tmp_path):
    fp = make_fp()
    e_bf = make_entry("bf", seed=1, scale=1e5)  # too large for fp16, fine for bf16
    with pytest.raises(CacheError, match="overflows"):
        write_shard(tmp_path, [e_bf], fp)
    write_shard(tmp_path, [e_bf], fp, value_dtype=torch.bfloat16)
    e32 = make_entry("f32", seed=2)
    write_shard(tmp_path, [e32], fp, value_dtype=torch.float32)
    c = EditCache.open(tmp_path)
    assert c.info("bf")["value_dtype"] == "bfloat16"
    assert_matches(c.entry("bf"), e_bf, atol=0, rtol=1e-2)
    got = c.entry("f32")
    assert torch.equal(got.delta[e32.mask], e32.delta[e32.mask])  # fp32 values are exact

    wrong_dff = make_entry("x", d_ff=32)
    with pytest.raises(CacheError, match="d_ff"):
        write_shard(tmp_path, [wrong_dff], fp)
    wrong_layers = make_entry("y", layers=(0, 1, 2, 3))
    with pytest.raises(CacheError, match="edited_layers"):
        write_shard(tmp_path, [wrong_layers], fp)
    with pytest.raises(CacheError, match="duplicate group ids"):
        write_shard(tmp_path, [make_entry("z"), make_entry("z")], fp)
    with pytest.raises(CacheError, match="invalid shard name"):
        write_shard(tmp_path, [make_entry("z")], fp, shard_name="../evil")
    assert sorted(EditCache.open(tmp_path).group_ids) == ["bf", "f32"]


@pytest.mark.parametrize("d_ff", [2048, 14336])
def test_bytes_per_edit_is_compact(tmp_path, d_ff):
    fp = make_fp(d_ff=d_ff)
    n = 16 if d_ff < 8192 else 6
    entries = [make_entry(f"group-{i:04d}", d_ff=d_ff, seed=i) for i in range(n)]
    write_shard(tmp_path, entries, fp)
    s = EditCache.open(tmp_path).stats()
    assert s["groups"] == n and s["shards"] == 1
    located = sum(e.n_located for e in entries)
    assert s["located_neurons"] == located
    payload = located * 2 + n * len(LAYERS) * ((d_ff + 7) // 8)  # fp16 values + mask bits
    dense = n * len(LAYERS) * d_ff * 4
    assert s["dense_fp32_bytes"] == dense
    assert s["bytes_on_disk"] == (tmp_path / MANIFEST_NAME).stat().st_size + shard_files(tmp_path)[0].stat().st_size
    # only small per-edit overhead (safetensors header + manifest JSON record)
    assert payload <= s["bytes_on_disk"] <= payload + n * 1024
    assert s["bytes_on_disk"] < dense / 4
    assert s["bytes_per_edit"] == pytest.approx(s["bytes_on_disk"] / n)


def test_several_shards_newest_wins_and_gc(tmp_path):
    fp = make_fp()
    a = [make_entry("g1", seed=1), make_entry("g2", seed=2)]
    b = [make_entry("g2", seed=22), make_entry("g3", seed=3)]
    write_shard(tmp_path, a, fp, shard_name="a")
    write_shard(tmp_path, b, fp, shard_name="b")
    c = EditCache.open(tmp_path, fp)
    assert sorted(c.group_ids) == ["g1", "g2", "g3"]
    assert c.info("g2")["shard"] == "shards/b.safetensors"
    assert_matches(c.entry("g2"), b[0])
    assert_matches(c.entry("g1"), a[0])
    assert c.stats()["shards"] == 2
    assert c.verify() == []

    # "a" is still referenced by g1: reusing its name would destroy g1
    with pytest.raises(CacheError, match="still holds groups"):
        write_shard(tmp_path, [make_entry("g9")], fp, shard_name="a")
    # replacing g1 too leaves shard "a" unused: it goes in the same commit, nothing for gc
    g1_new = make_entry("g1", seed=11)
    write_shard(tmp_path, [g1_new], fp, shard_name="c")
    assert not (tmp_path / "shards" / "a.safetensors").exists()
    assert c.verify() == [] and c.gc() == []
    assert_matches(c.entry("g1"), g1_new)  # an older snapshot re-reads the manifest when its shard is gone
    c = EditCache.open(tmp_path)
    assert_matches(c.entry("g1"), g1_new)
    # once no group uses a name, it may be reused
    write_shard(tmp_path, [make_entry("g4", seed=4)], fp, shard_name="a")
    assert EditCache.open(tmp_path).verify() == []


def test_fingerprint_mismatch_refused(tmp_path):
    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1")], fp)
    before = (tmp_path / MANIFEST_NAME).read_bytes()

    other = make_fp(layers_hash="cd" * 32)
    with pytest.raises(FingerprintMismatch, match="layers_hash") as ei:
        write_shard(tmp_path, [make_entry("g2")], other)
    assert ei.value.fields == ["layers_hash"]
    assert str(tmp_path) in str(ei.value)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    assert len(shard_files(tmp_path)) == 1  # the refused write left nothing behind

    with pytest.raises(FingerprintMismatch) as ei:
        EditCache.open(tmp_path, make_fp(name="qwen2-7b", n_layers=28))
    assert set(ei.value.fields) == {"name", "n_layers"}
    assert "name" in str(ei.value) and "n_layers" in str(ei.value) and "qwen2-7b" in str(ei.value)

    with pytest.raises(FingerprintMismatch, match="dtype"):
        EditCache.open(tmp_path, make_fp(dtype="bfloat16"))
    extra = dict(fp, revision="main")  # a key present on one side only also differs
    with pytest.raises(FingerprintMismatch, match="revision"):
        EditCache.open(tmp_path, extra)
    # tuples vs lists are the same JSON
    EditCache.open(tmp_path, dict(fp, edited_layers=tuple(LAYERS)))

    other_dir = tmp_path / "other"
    write_shard(other_dir, [make_entry("g3")], other)
    with pytest.raises(FingerprintMismatch, match="layers_hash"):
        merge_caches(tmp_path / "merged", [tmp_path, other_dir])
    with pytest.raises(FingerprintMismatch, match="layers_hash"):
        merge_caches(tmp_path, [other_dir])


def test_truncated_shard_reported_by_name(tmp_path):
    fp = make_fp()
    good = make_entry("good", seed=1)
    write_shard(tmp_path, [good], fp, shard_name="healthy")
    write_shard(tmp_path, [make_entry("bad1", seed=2), make_entry("bad2", seed=3)], fp, shard_name="broken")
    path = tmp_path / "shards" / "broken.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)

    for check in (True, False):  # caught by the sha256 check, and by safetensors itself
        c = EditCache.open(tmp_path, fp, check_hashes=check)
        with pytest.raises(CacheError, match="broken.safetensors"):
            c.entry("bad1")
        assert_matches(c.entry("good"), good)  # other shards unaffected
    problems = EditCache.open(tmp_path).verify()
    assert len(problems) == 1 and "broken.safetensors" in problems[0]

    # header cut off entirely
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(CacheError, match="broken.safetensors"):
        EditCache.open(tmp_path, check_hashes=False).entry("bad2")

    # same size, flipped data bytes: only the hash can tell
    write_shard(tmp_path, [make_entry("flip", seed=4)], fp, shard_name="flipped")
    fpath = tmp_path / "shards" / "flipped.safetensors"
    raw = bytearray(fpath.read_bytes())
    raw[-3] ^= 0xFF
    fpath.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="flipped.safetensors.*sha256"):
        EditCache.open(tmp_path).entry("flip")

    path.unlink()
    with pytest.raises(CacheError, match="broken.safetensors.*missing"):
        EditCache.open(tmp_path).entry("bad1")
    assert any("missing shard file" in p and "broken.safetensors" in p for p in EditCache.open(tmp_path).verify())


def test_corrupt_or_missing_manifest_reported_by_name(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        EditCache.open(tmp_path / "nowhere")
    with pytest.raises(CacheError, match="manifest.json"):
        EditCache.open(tmp_path)

    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1")], fp)
    man = tmp_path / MANIFEST_NAME
    text = man.read_text()
    man.write_text(text[: len(text) // 2])  # truncated JSON
    with pytest.raises(CacheError, match="manifest.json.*corrupt"):
        EditCache.open(tmp_path)
    # a writer must not paper over a corrupt manifest
    with pytest.raises(CacheError, match="manifest.json"):
        write_shard(tmp_path, [make_entry("g2")], fp)
    assert man.read_text() == text[: len(text) // 2]

    m = json.loads(text)
    del m["groups"]["g1"]["located"]
    man.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="manifest.json.*malformed.*located"):
        EditCache.open(tmp_path)
    m = json.loads(text)
    m["version"] = 99
    man.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="version 99"):
        EditCache.open(tmp_path)
    m = json.loads(text)
    m["groups"]["g1"]["shard"] = "../../etc/passwd"
    man.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="malformed"):
        EditCache.open(tmp_path)


def test_manifest_disagreeing_with_shard_is_not_half_loaded(tmp_path):
    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1")], fp)
    man = tmp_path / MANIFEST_NAME
    m = json.loads(man.read_text())
    m["groups"]["g1"]["located"][0] += 1
    man.write_text(json.dumps(m))
    c = EditCache.open(tmp_path)
    with pytest.raises(CacheError, match=r"\.safetensors"):
        c.entry("g1")
    assert any("g1" in p for p in c.verify())


def test_crash_between_shard_and_manifest(tmp_path, monkeypatch):
    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1", seed=1)], fp, shard_name="first")
    before = (tmp_path / MANIFEST_NAME).read_bytes()

    real_replace = os.replace

    def crashing_replace(src, dst):
        if Path(dst).name == MANIFEST_NAME:
            raise OSError("simulated crash before the manifest is committed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(CacheError, match=f"cannot write {tmp_path / MANIFEST_NAME}: simulated crash"):
        write_shard(tmp_path, [make_entry("g1", seed=5), make_entry("g2", seed=2)], fp, shard_name="second")
    monkeypatch.setattr(os, "replace", real_replace)

    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    assert not (tmp_path / "shards" / "second.safetensors").exists()  # the failed commit took its shard back
    c = EditCache.open(tmp_path, fp)
    assert c.group_ids == ["g1"]
    assert_matches(c.entry("g1"), make_entry("g1", seed=1))  # old value, not the uncommitted one
    assert not [p for p in tmp_path.rglob("*.tmp")]  # the temp manifest was cleaned up
    assert c.verify() == []
    # a real crash (the process dies between shard and manifest) leaves an orphan: verify, gc
    orphan = tmp_path / "shards" / "second.safetensors"
    orphan.write_bytes((tmp_path / "shards" / "first.safetensors").read_bytes())
    problems = c.verify()
    assert len(problems) == 1 and "orphan" in problems[0] and "second.safetensors" in problems[0]
    assert [p.name for p in c.gc()] == ["second.safetensors"]
    assert c.verify() == []
    # the cache keeps working after the crash
    write_shard(tmp_path, [make_entry("g2", seed=2)], fp, shard_name="second")
    assert sorted(EditCache.open(tmp_path).group_ids) == ["g1", "g2"]


def test_stale_temp_file_reported_and_collected(tmp_path):
    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1")], fp)
    stale = tmp_path / "shards" / ".x.safetensors.123.abcd.tmp"
    stale.write_bytes(b"partial")
    c = EditCache.open(tmp_path)
    assert any("stale temporary file" in p for p in c.verify())
    assert c.gc() == [stale]
    assert c.verify() == []


def test_delete_round_trip(tmp_path):
    fp = make_fp()
    es = [make_entry(f"g{i}", seed=i) for i in range(4)]
    write_shard(tmp_path, es, fp)
    c = EditCache.open(tmp_path, fp)
    c.delete("g1")
    assert "g1" not in c and len(c) == 3
    c.delete(["g2", "g3"])  # roll back a whole edit batch in one manifest write
    assert EditCache.open(tmp_path).group_ids == ["g0"]
    with pytest.raises(KeyError, match="g1"):
        c.delete("g1")
    c.delete("g1", missing_ok=True)
    assert_matches(EditCache.open(tmp_path).entry("g0"), es[0])
    assert c.verify() == []  # the shard is still used by g0
    c.delete("g0")
    assert len(EditCache.open(tmp_path)) == 0
    assert c.gc() == [] and c.verify() == []  # the shard nobody uses went with the delete
    # re-adding after rollback works
    write_shard(tmp_path, [es[1]], fp)
    assert_matches(EditCache.open(tmp_path).entry("g1"), es[1])


def test_merge_round_trip(tmp_path):
    fp = make_fp()
    r0, r1, dest = tmp_path / "rank0", tmp_path / "rank1", tmp_path / "merged"
    e0 = [make_entry("a", seed=1), make_entry("shared", seed=2)]
    e1 = [make_entry("b", seed=3), make_entry("shared", seed=4)]
    # same shard name in both sources, different content: must not clobber
    write_shard(r0, e0, fp, shard_name="part")
    write_shard(r1, e1, fp, shard_name="part")
    write_shard(r1, [make_entry("c", seed=5)], fp, shard_name="extra")

    m = merge_caches(dest, [r0, EditCache.open(r1)])
    assert sorted(m.group_ids) == ["a", "b", "c", "shared"]
    assert_matches(m.entry("shared"), e1[1])  # later source wins
    assert_matches(m.entry("a"), e0[0])
    assert_matches(m.entry("b"), e1[0])
    assert len(shard_files(dest)) == 3
    assert m.verify() == []
    # hard links where possible
    assert (dest / "shards" / "extra.safetensors").stat().st_ino == (r1 / "shards" / "extra.safetensors").stat().st_ino

    # merging into an existing cache keeps its groups; the sources win on clashes
    # (copying instead of linking on request; an identical file already in dest is reused)
    write_shard(r0, [make_entry("d", seed=6)], fp, shard_name="late")
    m2 = merge_caches(dest, [r0], link=False)
    assert sorted(m2.group_ids) == ["a", "b", "c", "d", "shared"]
    assert_matches(m2.entry("shared"), e0[1])
    assert (dest / "shards" / "late.safetensors").stat().st_ino != (r0 / "shards" / "late.safetensors").stat().st_ino
    assert len(shard_files(dest)) == 4
    assert m2.verify() == []

    # delete in the merged cache leaves the sources alone
    m2.delete("a")
    assert "a" not in EditCache.open(dest) and "a" in EditCache.open(r0)

    # a corrupt source shard is refused and nothing changes in dest
    before = (dest / MANIFEST_NAME).read_bytes()
    p = r1 / "shards" / "extra.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    os.unlink(p)  # break the hard link first so dest's copy stays intact
    p.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="extra.safetensors"):
        merge_caches(tmp_path / "merged2", [r0, r1])
    assert not (tmp_path / "merged2" / MANIFEST_NAME).exists()
    assert not list((tmp_path / "merged2").rglob("*.tmp"))
    assert (dest / MANIFEST_NAME).read_bytes() == before
    # dest already holds an intact copy with the recorded sha256, so that one is used
    m3 = merge_caches(dest, [r1])
    # r1 now wins "shared" again, so nothing references r0's "part" in dest any more: removed by the merge
    assert not (dest / "shards" / "part.safetensors").exists()
    assert m3.verify() == [] and m3.gc() == []
    assert_matches(m3.entry("c"), make_entry("c", seed=5))


def test_no_pickle_in_the_package_source():
    """No module of the package or its callbacks pickles: no pickle import, no torch.save, and
    every torch.load is weights_only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in root.joinpath("lafn_lightning").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "torch.save(" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_no_pickle_anywhere(tmp_path):
    fp = make_fp()
    write_shard(tmp_path, [make_entry("g1"), make_entry("g2", seed=1)], fp)
    write_shard(tmp_path, [make_entry("g3", seed=3)], fp, value_dtype=torch.bfloat16)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    assert names == {MANIFEST_NAME, ".lock"} | {f"shards/{p.name}" for p in shard_files(tmp_path)}
    for p in files:
        raw = p.read_bytes()
        assert not raw.startswith(b"\x80"), f"{p} looks like a pickle"
        assert not raw.startswith(b"PK"), f"{p} looks like a torch.save zip"
        if p.name == MANIFEST_NAME:
            json.loads(raw)
        elif p.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + n])
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            assert 8 + n + max(ends) == len(raw)
            dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
            assert dtypes <= {"F16", "BF16", "U8"}  # never a dense fp32 tensor
            for k, v in header.items():
                if k.endswith(".mask"):
                    assert v["dtype"] == "U8"
                    assert v["shape"] == [len(LAYERS), (fp["d_ff"] + 7) // 8]
            assert header["__metadata__"]["format"] == "lafn-edit-cache-shard"
        else:
            assert raw == b""  # the lock file
    src = inspect.getsource(cache_mod)
    for banned in ("import pickle", "torch.save(", "torch.load(", "pickle.load"):
        assert banned not in src


def _writer(cache_dir: str, worker: int, n_shards: int, per_shard: int, barrier) -> None:
    fp = make_fp()
    barrier.wait()
    for s in range(n_shards):
        es = [make_entry(f"w{worker}-s{s}-{j}", seed=1000 * worker + 10 * s + j) for j in range(per_shard)]
        write_shard(cache_dir, es, fp)


def test_concurrent_writers(tmp_path):
    # fork: no second torch import, so this stays fast (same pattern as DataLoader workers);
    # the writers only share the directory, exactly like separate ranks or runs would.
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    n_shards, per_shard = 6, 3
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, n_shards, per_shard, barrier)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    c = EditCache.open(tmp_path, make_fp())
    expected = {f"w{w}-s{s}-{j}" for w in range(2) for s in range(n_shards) for j in range(per_shard)}
    assert set(c.group_ids) == expected
    assert len(shard_files(tmp_path)) == 2 * n_shards
    assert c.verify() == []
    e = make_entry("w1-s5-2", seed=1000 + 50 + 2)
    assert_matches(c.entry("w1-s5-2"), e)


def test_stats_and_list_tell_which_groups_did_not_converge(tmp_path, capsys):
    from lafn_lightning.cli.cache import cache_command

    entries = [make_entry(f"g{i}", seed=i) for i in range(4)]
    for e, converged in zip(entries, (True, False, True, None)):
        if converged is not None:       # g3: an export that did not record it (another method)
            e.meta["converged"] = converged
    write_shard(tmp_path, entries, make_fp())
    s = EditCache.open(tmp_path).stats()
    assert s["converged"] == 2 and s["not_converged"] == ["g1"]
    cache_command(["list", str(tmp_path)])
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert "(not converged)" in lines["g1"]
    assert all("not converged" not in lines[g] for g in ("g0", "g2", "g3"))
