"""Edit throughput: a straightforward ΔV loop against the project's loop, in one run.

    python benchmarks/edit_throughput.py                    # demo backbone, groups 0:16, en+zh
    python benchmarks/edit_throughput.py --backbone tiny    # quick run on a tiny random model
    python benchmarks/edit_throughput.py --sizes 16 -- --data.bare_prompt true   # options for both loops
    python benchmarks/edit_throughput.py --sizes 16 --variant "drop=--model.drop_converged true"

Anything after ``--`` goes to the ``lafn fit`` configuration of both loops (the baseline reads its
batch, prompts and hyper-parameters from the same configuration).

Both loops edit the same groups with the same neurons (``locate_group``), loss, learning rate,
step budget and stopping rule (a group stops once its L_target < ``model.stop_loss``):

* **baseline**: one group at a time, plain PyTorch, full forward through every layer with the
  logits of every position over the whole vocabulary, fp32.
* **project b=K**: ``lafn fit`` on edit batches of K groups (one batched forward, converged
  groups leave the batch, logits only at answer positions, cached lower layers) in ``--dtype``.

Printed per loop: seconds per group (wall time including data, locating and export), steps,
reliability (teacher-forced token F1 x100 of edit question -> new answer, every selected language,
all groups' edits cached, each loop's edits scored with the backbone in the precision it was
trained in), and the achieved FLOP/s of the optimisation steps (FLOPs counted by
``torch.utils.flop_counter`` during the steps) as a fraction of the matrix-multiply peak measured
here in the same precision. The last line is ``speedup=X reliability_project=Y reliability_baseline=Z``
(speedup and reliability of the largest edit batch in the first ``--dtype``).
Each ``--variant NAME=OPTIONS`` adds a project loop with further ``lafn fit`` options (largest batch,
every dtype), timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from lafn_lightning.api.settings import resolve_config, resolve_config_args
from lafn_lightning.editing.sizing import matmul_peak



class StepMeter:
    """Time and FLOPs (``count_flops``) of optimisation steps, everything between a step's start
    and end, step by step; ``device``: a GPU's queued work is waited for at both ends."""

    def __init__(self, count_flops: bool = True) -> None:
        self.step_seconds: list[float] = []
        self.step_flops: list[int] = []
        self._count, self._t, self._mode = count_flops, 0.0, None

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def flops(self) -> int:
        return sum(self.step_flops)

    def start(self, device: torch.device | None = None) -> None:
        if self._count:
            self._mode = FlopCounterMode(display=False)
            self._mode.__enter__()
        _sync(device)
        self._t = time.perf_counter()

    def stop(self, device: torch.device | None = None) -> None:
        _sync(device)
        self.step_seconds.append(time.perf_counter() - self._t)
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.step_flops.append(self._mode.get_total_flops())
            self._mode = None


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":   # time what the GPU did, not what was queued
        torch.cuda.synchronize(device)


class MeterCallback(L.Callback):
    """A :class:`StepMeter` around every training batch of a fit."""

    def __init__(self, meter: StepMeter) -> None:
        self.meter = meter

    def on_train_batch_start(self, trainer, module, *args) -> None:
        self.meter.start(module.device)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.meter.stop(module.device)


def _cli(base: list[str], *extra: str):
    from lafn_lightning.api.settings import LafnCLI

    return LafnCLI(resolve_config_args([*base, *extra]), run=False)   # -c presets/... by name, as in lafn


def baseline(base: list[str], index: int, cache_dir: Path, meter: StepMeter) -> int:
    """Edit group ``index`` alone with a plain loop; export it to ``cache_dir``; return its steps."""
    from lafn_lightning.backbone.fingerprint import fingerprint
    from lafn_lightning.cache import CacheEntry, write_shard
    from lafn_lightning.editing.injection import delta_hooks
    from lafn_lightning.editing.locate import locate_group

    cli = _cli(base, "--data.groups", json.dumps([index]), "--model.dtype", "float32")
    module, dm, cfg = cli.model, cli.datamodule, cli.config
    hp = module.hparams
    dm.setup("fit")
    model, adapter, layers = module.backbone, module.adapter, module.layers
    group = dm.groups[0]
    mask, _ = locate_group(model, adapter, layers, module.tokenizer, dm.locating_corpus(group),
                           beta=cfg.locate.beta, strategy=cfg.locate.strategy,
                           seed=cfg.locate.seed + zlib.crc32(group.group_id.encode()))
    b = dm.batch
    delta = torch.zeros(len(layers), adapter.d_ff, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)

    def logits(ids, att, positions, dv):
        rows = torch.arange(len(ids))
        with delta_hooks(model, adapter, layers, hp.site, rows, positions, dv.expand(len(ids), -1, -1)):
            return module._run(ids, att, keep=0)               # every position, whole vocabulary

    with torch.no_grad():
        ref = module._run(b["kl_input_ids"], b["kl_attention_mask"], keep=0)[:, -1].float().log_softmax(-1)
    steps = 0
    for _ in range(cfg.trainer.max_steps):
        meter.start()
        dv = delta * mask
        out = logits(b["input_ids"], b["attention_mask"], b["subject_pos"], dv)
        logp = out[:, :-1].float().log_softmax(-1)
        tok = logp.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        tmask = b["target_mask"][:, :-1]
        target = (-(tok * tmask).sum(1) / tmask.sum(1).clamp(min=1)).mean()
        edited = logits(b["kl_input_ids"], b["kl_attention_mask"], b["kl_subject_pos"], dv)[:, -1].float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(edited, ref, log_target=True, reduction="none").sum(-1).mean()
        steps += 1
        if float(target) < hp.stop_loss:
            meter.stop()
            break
        opt.zero_grad()
        (hp.lambda_target * target + hp.lambda_kl * kl).backward()
        opt.step()
        meter.stop()
    entry = CacheEntry(group_id=group.group_id, subjects={l: e.subject for l, e in group.edits.items()},
                       layers=tuple(layers), mask=mask, delta=(delta * mask).detach(), meta={"steps": steps})
    write_shard(cache_dir, [entry], fingerprint(model, layers))
    return steps


def project(base: list[str], indices: list[int], cache_dir: Path, dtype: str, meter: StepMeter,
            extra: Sequence[str] = ()) -> int:
    """Edit ``indices`` with ``lafn fit`` (one fit per edit batch, ``extra`` options added); return
    the total steps of all groups."""
    cli = _cli(base, "--data.groups", json.dumps(indices), "--model.dtype", dtype, "--cache_dir", str(cache_dir), *extra)
    cli.trainer.callbacks.append(MeterCallback(meter))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return int(cli.model.steps.sum())


def reliability(groups, languages, cache_dir: Path, backbone: str, dtype: str) -> float:
    """Teacher-forced token F1 x100 of every edit question -> new answer with all edits cached."""
    from lafn_lightning import EditedModel
    from lafn_lightning.evaluation.metrics import score_predictions, teacher_forced_predictions

    em = EditedModel.from_cache(cache_dir, backbone=backbone, dtype=dtype)
    f1s = []
    for lang in languages:
        edits = [g.edits[lang] for g in groups if lang in g.edits]
        pairs = teacher_forced_predictions(em, em.tokenizer, [e.prompt for e in edits], [e.target for e in edits])
        f1s += score_predictions(em.tokenizer, [p for p, _ in pairs], [r for _, r in pairs])[0]
    return 100.0 * sum(f1s) / len(f1s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["demo", "tiny"], default="demo", help="configs/demo.yaml or configs/tiny.yaml")
    parser.add_argument("--groups", default="0:16", help="data.groups of the run (default 0:16)")
    parser.add_argument("--languages", default="[en, zh]", help="data.languages (default [en, zh]; null = all)")
    parser.add_argument("--sizes", default="1,4,16", help="edit-batch sizes of the project loop")
    parser.add_argument("--dtype", default="bfloat16",
                        help="backbone dtype(s) of the project loop, comma-separated (float32, bfloat16); "
                             "the last line reports the largest edit batch of the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--out", default=None, help="where the caches go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="a further project loop (largest batch) with these lafn fit options, e.g. "
                             "'drop=--model.drop_converged true'; repeatable")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.fit_args = argv[cut + 1:]
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="lafn_throughput_"))
    base = ["-c", resolve_config(args.backbone), "--data.groups", args.groups,
            "--data.languages", args.languages, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(out), *args.fit_args]
    probe = _cli(base, "--cache_dir", str(out / "probe"))
    groups, languages = probe.datamodule.groups, list(probe.datamodule.languages)
    backbone = probe.model.hparams.backbone
    indices = [g.index for g in groups]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    from lafn_lightning.backbone.loading import load_backbone

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for dtype in {"float32", *dtypes}:                           # load (and convert) outside the timings
        load_backbone(backbone, dtype)
    peaks = {d: matmul_peak(getattr(torch, d)) for d in {"float32", *dtypes}}
    print(f"[throughput] {len(groups)} groups x {len(languages)} languages on {backbone}, {args.threads} threads; "
          f"matmul peak " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()), flush=True)

    rows = []

    def record(name: str, dtype: str, seconds: float, steps: int, meter: StepMeter, cache: Path) -> None:
        rel = reliability(groups, languages, cache, backbone, dtype)
        achieved = meter.flops / max(meter.seconds, 1e-9)
        rows.append({"loop": name, "dtype": dtype, "sec_per_group": seconds / len(groups), "steps": steps,
                     "opt_seconds": meter.seconds, "tflop": meter.flops / 1e12, "gflops": achieved / 1e9,
                     "peak_fraction": achieved / peaks[dtype], "reliability": rel})
        print(f"[throughput] {name}: {seconds / len(groups):.1f} s/group, reliability {rel:.1f}", flush=True)

    meter, t = StepMeter(), time.perf_counter()
    steps = sum(baseline(base, i, out / "baseline", meter) for i in indices)
    record("baseline", "float32", time.perf_counter() - t, steps, meter, out / "baseline")
    for dtype in dtypes:
        for size in sizes:
            meter, t, steps = StepMeter(), time.perf_counter(), 0
            cache = out / f"b{size}-{dtype}"
            for start in range(0, len(indices), size):
                steps += project(base, indices[start:start + size], cache, dtype, meter)
            record(f"project b={size}", dtype, time.perf_counter() - t, steps, meter, cache)
        for variant in args.variant:
            name, _, options = variant.partition("=")
            meter, t, steps = StepMeter(), time.perf_counter(), 0
            cache = out / f"{name}-{dtype}"
            for start in range(0, len(indices), sizes[-1]):
                steps += project(base, indices[start:start + sizes[-1]], cache, dtype, meter, shlex.split(options))
            record(f"{name} b={sizes[-1]}", dtype, time.perf_counter() - t, steps, meter, cache)

    base_s = rows[0]["sec_per_group"]
    print()
    print("| loop | dtype | s/group | speed-up | steps | optimisation TFLOP | GFLOP/s | of peak | reliability |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loop']} | {r['dtype']} | {r['sec_per_group']:.1f} | {base_s / r['sec_per_group']:.2f}x | {r['steps']} | "
              f"{r['tflop']:.2f} | {r['gflops']:.0f} | {100 * r['peak_fraction']:.0f}% | {r['reliability']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    last = rows[len(sizes)]                                     # the largest batch of the first dtype
    rows_by_name = {r["loop"]: r for r in rows if r["dtype"] == dtypes[0]}
    for variant in args.variant:
        r = rows_by_name[f"{variant.partition('=')[0]} b={sizes[-1]}"]
        print(f"speedup[{r['loop']}]={base_s / r['sec_per_group']:.2f} reliability={r['reliability']:.1f}")
    print(f"speedup={base_s / last['sec_per_group']:.2f} reliability_project={last['reliability']:.1f} "
          f"reliability_baseline={rows[0]['reliability']:.1f}")


if __name__ == "__main__":
    main()
