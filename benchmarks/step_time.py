"""Seconds per optimisation step of an edit batch, without running the fit to convergence.

    python benchmarks/step_time.py                               # demo, group 0, 12 languages, preset, fp32
    python benchmarks/step_time.py --groups 0:4 --dtype bfloat16
    python benchmarks/step_time.py --steps 6 -- --model.chunked_loss false

Runs ``lafn fit -c demo -c presets/twelve_languages --model.layers "[5,6,7,8]"`` (the 12-language
setting of docs/twelve_languages.md) for ``--steps`` steps and prints the wall time of every step
(from the start of a training batch to its end: forward, backward, Adam), the mean over the steps
after the first (warm-up), the step's target loss and the process's peak RSS. One process runs
one setting: compare two settings (or two commits) by running it twice in a row on an idle
machine. Anything after ``--`` goes to ``lafn fit`` unchanged.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lafn_lightning.api.settings import LafnCLI

REPO = Path(__file__).resolve().parents[1]


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds.append(time.perf_counter() - self._t)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="0:1", help="data.groups (default 0:1)")
    parser.add_argument("--languages", default="null", help="data.languages (default null: all 12)")
    parser.add_argument("--dtype", default="float32", help="model.dtype (default float32)")
    parser.add_argument("--steps", type=int, default=4, help="optimisation steps (default 4; the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv[:cut])
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="lafn_step_time_"))
    fit_args = ["-c", str(REPO / "configs" / "demo.yaml"), "-c", str(REPO / "configs" / "presets" / "twelve_languages.yaml"),
                "--model.layers", "[5,6,7,8]", "--model.dtype", args.dtype, "--data.groups", args.groups,
                "--data.languages", args.languages, "--trainer.max_steps", str(args.steps),
                "--cache_dir", str(out / "cache"), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.default_root_dir", str(out), *argv[cut + 1:]]
    try:
        cli = LafnCLI(fit_args, run=False)
        clock = _StepClock()
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steady = clock.seconds[1:]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"[step time] groups {args.groups}, languages {args.languages}, {args.dtype}, {args.threads} threads, "
          f"extra {argv[cut + 1:]}")
    print(f"[step time] steps (s): {[round(s, 2) for s in clock.seconds]}")
    print(f"[step time] mean after warm-up: {sum(steady) / len(steady):.2f} s/step; "
          f"target loss after {len(clock.seconds)} steps: {cli.model.final_target_loss.mean():.6f}; peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
