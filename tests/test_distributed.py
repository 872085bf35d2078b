"""Two CPU processes (gloo, Lightning's own DDP launcher) give the same cache as one process."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS
from lafn_lightning.cache import EditCache

pytestmark = pytest.mark.distributed


def _lafn_fit(tmp_path, cache, *extra, command=("fit", "--data.groups", "0:3")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lafn_lightning.cli", command[0], "-c", str(CONFIGS / "tiny.yaml"), *command[1:],
           "--cache_dir", str(cache), "--trainer.max_steps", "3",
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(tmp_path), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    _lafn_fit(tmp_path, tmp_path / "one")
    _lafn_fit(tmp_path, tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one, two = EditCache.open(tmp_path / "one"), EditCache.open(tmp_path / "two")
    assert sorted(one.group_ids) == sorted(two.group_ids) == ["mzsre:0", "mzsre:1", "mzsre:2"]
    # Both processes wrote a shard into the one cache.
    assert len({two.info(g)["shard"] for g in two.group_ids}) == 2
    for gid in one.group_ids:
        a, b = one.entry(gid), two.entry(gid)
        assert torch.equal(a.mask, b.mask)
        assert a.delta.abs().sum() > 0
        assert torch.allclose(a.delta, b.delta, atol=1e-3, rtol=1e-3)
        assert a.meta["steps"] == b.meta["steps"] == 3


def test_whole_dataset_on_two_processes_equals_one(tmp_path):
    """`lafn edit-dataset` with trainer.devices=2: every edit batch is sharded over the two
    processes Lightning launches once, and all shards land in the one cache. 5 groups in batches
    of 2: the last group joins the previous batch (a batch of 1 cannot feed 2 devices)."""
    command = ("edit-dataset", "--data.groups", "0:5", "--edit_batch_size", "2")
    _lafn_fit(tmp_path, tmp_path / "one", command=command)
    _lafn_fit(tmp_path, tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp", command=command)
    one, two = EditCache.open(tmp_path / "one"), EditCache.open(tmp_path / "two")
    assert sorted(one.group_ids) == sorted(two.group_ids) == [f"mzsre:{i}" for i in range(5)]
    assert len({two.info(g)["shard"] for g in two.group_ids}) == 4      # 2 batches x 2 processes
    for gid in one.group_ids:
        a, b = one.entry(gid), two.entry(gid)
        assert torch.equal(a.mask, b.mask)
        assert torch.allclose(a.delta, b.delta, atol=1e-3, rtol=1e-3)
