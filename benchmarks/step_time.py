"""Seconds per optimisation step of an edit batch, without running the fit to convergence.

    python benchmarks/step_time.py                               # demo, group 0, 12 languages, preset, fp32
    python benchmarks/step_time.py --groups 0:4 --dtype bfloat16
    python benchmarks/step_time.py --steps 6 -- --model.chunked_loss false
    python benchmarks/step_time.py --groups 0:4 --dtype bfloat16 --flops --group-steps 65
    # a GPU: the paper's edit batch on a random-weight Llama-3.1-8B (no checkpoint needed)
    python benchmarks/step_time.py --config llama3.1-8b --groups 0:16 --dtype bfloat16 --flops \
        --group-steps 65 -- --model.backbone random-llama3.1-8b+TOKENIZER_DIR --trainer.accelerator gpu

Runs ``lafn fit -c demo -c presets/twelve_languages`` (the 12-language setting of
docs/twelve_languages.md; ``--config`` another backbone's config, with that config's own layers)
for ``--steps`` steps and prints the wall time of every step
(from the start of a training batch to its end: forward, backward, Adam), the mean over the steps
after the first (warm-up), the step's target loss and the process's peak RSS. One process runs
one setting: compare two settings (or two commits) by running it twice in a row on an idle
machine. Anything after ``--`` goes to ``lafn fit`` unchanged.

``--flops`` also counts each step's FLOPs (``torch.utils.flop_counter``, as
``edit_throughput.py`` does) and measures this machine's matrix-multiply peak in ``--dtype``:
it prints GFLOP per group and step, the achieved share of the peak, and the compute bound, the
seconds per group step at 100 % of the peak (times ``--group-steps``, e.g. the mean steps per
group of a real run, for seconds per group). The counter slows a step (about 1.4x on the demo
backbone on CPU); take the seconds from a run without it. On a GPU the peak GPU memory is printed
too. ``random-<name>`` backbones (``lafn_lightning.backbone.tiny.FULL_SIZE``) have a paper
backbone's architecture with random weights; give them a real tokenizer folder after ``+`` (the
demo's Gemma tokenizer, ``~/.cache/lafn_lightning/gemma-3-270m``, a multilingual BPE like
those of the paper backbones; its larger vocabulary enlarges the LM head, which the FLOP count
includes), as the byte-level default makes rows several times longer.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from edit_throughput import MeterCallback, StepMeter, matmul_peak   # this folder: one meter and peak for both

from lafn_lightning.api.settings import LafnCLI, resolve_config, resolve_config_args



class _StepClock(MeterCallback):
    """The throughput benchmark's meter, step by step, and the groups still training at each step's start."""

    def __init__(self, flops: bool = False) -> None:
        super().__init__(StepMeter(count_flops=flops))
        self.active: list[int] = []

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.active.append(int((~module.stopped).sum()))
        super().on_train_batch_start(trainer, module, *args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="configs/<name>.yaml (default demo, with layers 5-8)")
    parser.add_argument("--groups", default="0:1", help="data.groups (default 0:1)")
    parser.add_argument("--languages", default="null", help="data.languages (default null: all 12)")
    parser.add_argument("--dtype", default="float32", help="model.dtype (default float32)")
    parser.add_argument("--steps", type=int, default=4, help="optimisation steps (default 4; the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per step; measure the matmul peak")
    parser.add_argument("--group-steps", type=float, default=None,
                        help="with --flops: steps per group (e.g. a run's mean) for the bound in seconds per group")
    args = parser.parse_args(argv[:cut])
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="lafn_step_time_"))
    config = Path(resolve_config(args.config))
    own = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("layers")
    layers = [] if args.config == "demo" else ["--model.layers", json.dumps(own)]   # the preset's are the demo's
    fit_args = ["-c", str(config), "-c", resolve_config("presets/twelve_languages"),
                *layers, "--model.dtype", args.dtype, "--data.groups", args.groups,
                "--data.languages", args.languages, "--trainer.max_steps", str(args.steps),
                "--cache_dir", str(out / "cache"), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.default_root_dir", str(out), *resolve_config_args(argv[cut + 1:])]
    try:
        cli = LafnCLI(fit_args, run=False)
        clock = _StepClock(flops=args.flops)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    steady = clock.meter.step_seconds[1:]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    device = cli.trainer.strategy.root_device
    print(f"[step time] groups {args.groups}, languages {args.languages}, {args.dtype}, {args.threads} threads, "
          f"extra {argv[cut + 1:]}")
    print(f"[step time] steps (s): {[round(s, 2) for s in clock.meter.step_seconds]}")
    print(f"[step time] mean after warm-up: {sum(steady) / len(steady):.2f} s/step; "
          f"target loss after {len(clock.meter.step_seconds)} steps: {cli.model.final_target_loss.mean():.6f}; peak RSS {peak_gb:.2f} GB"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if device.type == "cuda" else ""))
    if args.flops:
        _print_flops(clock, args, device)


def _print_flops(clock: _StepClock, args, device: torch.device) -> None:
    """FLOPs per group step, achieved share of the matmul peak, compute bound (see the module)."""
    gpu = device.type == "cuda"
    peak = matmul_peak(getattr(torch, args.dtype), n=8192 if gpu else 2048, device=str(device))
    steady = range(1, len(clock.meter.step_seconds))
    per_group = [clock.meter.step_flops[i] / max(clock.active[i], 1) for i in steady]
    gflop = sum(per_group) / len(per_group) / 1e9
    rate = sum(clock.meter.step_flops[i] for i in steady) / sum(clock.meter.step_seconds[i] for i in steady)
    bound = gflop * 1e9 / peak
    measured = sum(clock.meter.step_seconds[i] / max(clock.active[i], 1) for i in steady) / len(steady)
    print(f"[step time] {gflop:.1f} GFLOP per group and step ({clock.active[1]} group(s) training); "
          f"achieved {rate / 1e9:.0f} GFLOP/s = {100 * rate / peak:.0f}% of the {args.dtype} {device.type} matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; {measured:.2f} s per group step measured (with the counter), "
          f"compute bound {bound:.2f} s at the peak"
          + (f"; at {args.group_steps:g} steps per group: {measured * args.group_steps:.0f} s measured, "
             f"{bound * args.group_steps:.0f} s bound" if args.group_steps else ""))


if __name__ == "__main__":
    main()
