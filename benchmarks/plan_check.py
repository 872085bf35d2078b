"""Check ``lafn plan`` against measured fits: peak memory and seconds per step, predicted vs measured.

    python benchmarks/plan_check.py                                  # the validation table (tiny, demo; en+zh, 12 languages)
    python benchmarks/plan_check.py --rows demo-12 --steps 3         # one row
    python benchmarks/plan_check.py --child -c demo --data.groups 0:16 --data.languages null   # one measurement

Each row runs ``lafn fit`` in a fresh process for ``--steps`` steps (neuron locating replaced by
all-neuron masks, which changes neither memory nor step time; ``model.stop_loss 0`` so no group
leaves the batch), and reads the process's peak resident memory (``ru_maxrss``; the figure
``/usr/bin/time -v`` prints) and the wall time of each step after the first; the prediction is
``lafn plan`` with the same options (peak memory; seconds per step at ``--peak_tflops`` or this
machine's measured matmul peak times ``--mfu``). Run it alone on the machine: the seconds of a
shared machine are not comparable. Prints one table row per setting and the relative errors.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

#: name -> (config, extra options): the validation rows
ROWS = {
    "tiny-enzh": ("tiny", ["--data.groups", "0:16", "--data.languages", "[en,zh]", "--data.num_prefixes", "4",
                           "--data.prefix_length", "5"]),
    "tiny-12": ("tiny", ["--data.groups", "0:16", "--data.languages", "null", "--data.num_prefixes", "4",
                         "--data.prefix_length", "5"]),
    "demo-enzh": ("demo", ["--data.groups", "0:16", "--data.languages", "[en,zh]"]),
    "demo-12": ("demo", ["--data.groups", "0:16", "--data.languages", "null"]),
    "demo-12-fp32": ("demo", ["--data.groups", "0:4", "--data.languages", "null", "--model.dtype", "float32"]),
    "demo-12-onegraph": ("demo", ["--data.groups", "0:8", "--data.languages", "null", "--model.max_rows", "null"]),
}


def child(argv: list[str]) -> None:
    """One measured fit: prints a JSON line with the peak RSS and the seconds of each step."""
    import lightning as L

    import lafn_lightning.callbacks.neuron_locator as locator
    from lafn_lightning.api.settings import LafnCLI, resolve_config_args

    def all_neurons(model, adapter, layers, tokenizer, corpora, **kwargs):
        mask = torch.ones(len(layers), adapter.d_ff, dtype=torch.bool)
        return [(mask, {lang: mask for lang in corpus}) for corpus in corpora]

    locator.locate_groups = all_neurons

    class Clock(L.Callback):
        def __init__(self):
            self.seconds, self.t = [], 0.0

        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            self.seconds.append(time.perf_counter() - self.t)

    out = tempfile.mkdtemp(prefix="lafn_plan_check_")
    cli = LafnCLI(resolve_config_args([*argv, "--cache_dir", out, "--trainer.logger", "false",
                                       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                                       "--trainer.default_root_dir", out, "--model.stop_loss", "0",
                                       "--routing.keys", "false"]), run=False)
    clock = Clock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                      "step_seconds": clock.seconds, "max_rows": cli.model.rows_per_forward}))


def _shift(groups: str, by: int) -> str:
    start, stop = (int(x) for x in groups.split(":"))
    return f"{start + by}:{stop + by}"


def main() -> None:
    if "--child" in sys.argv:
        torch.set_num_threads(2)
        child([a for a in sys.argv[1:] if a != "--child"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    parser.add_argument("--steps", type=int, default=3, help="steps per measured fit (the first is not timed)")
    parser.add_argument("--mfu", type=float, default=None, help="share of the matmul peak for the time prediction "
                        "(default: lafn plan's own per-device default)")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--replay", default=None, help="take the measurements from the stderr of an earlier run "
                        "(its '[plan check] ROW: {...}' lines) instead of running the fits; predict again")
    parser.add_argument("--shift", type=int, default=0, help="move every row's groups by this many records "
                        "(e.g. 16: groups 16:32 instead of 0:16), to check on groups the constants were not fitted on")
    args = parser.parse_args()
    from lafn_lightning.api.plan import plan
    from lafn_lightning.api.settings import Settings

    from lafn_lightning.backbone.loading import resolve_dtype
    from lafn_lightning.editing.sizing import matmul_peak

    peaks = {}   # per dtype, measured once before any fit (the machine must be idle)
    table = []
    for name in args.rows.split(","):
        config, extra = ROWS[name]
        extra = [_shift(a, args.shift) if i and extra[i - 1] == "--data.groups" else a for i, a in enumerate(extra)]
        settings = Settings.from_config(config, args=extra)
        dtype = resolve_dtype(settings.model.get("dtype", "float32"))
        if args.peak_tflops is None and dtype not in peaks:
            peaks[dtype] = max(matmul_peak(dtype) for _ in range(3)) / 1e12
            print(f"[plan check] {dtype} matmul peak {peaks[dtype]:.3f} TFLOP/s", file=sys.stderr, flush=True)
        opts = {"peak_tflops": args.peak_tflops or peaks[dtype]}
        if args.mfu:
            opts["mfu"] = args.mfu
        predicted = plan(settings, edit_batch_size=10 ** 6, **opts)
        if args.replay:
            lines = [x for x in open(args.replay, encoding="utf-8") if x.startswith(f"[plan check] {name}: {{")]
            measured = json.loads(lines[-1].split(": ", 1)[1])
        else:
            proc = subprocess.run([sys.executable, __file__, "--child", "-c", config, *extra,
                                   "--trainer.max_steps", str(args.steps)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name}: the measured fit failed:\n{proc.stderr[-3000:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
        steady = measured["step_seconds"][1:]
        seconds = sum(steady) / len(steady)
        step = predicted["seconds_per_group_step"] * predicted["groups"]
        table.append((name, predicted["max_rows"], measured["max_rows"], predicted["peak_memory_gb"], measured["peak_gb"],
                      step, seconds))
        print(f"[plan check] {name}: {json.dumps(measured)}", file=sys.stderr, flush=True)
    print("| row | max_rows plan / fit | peak GB plan | peak GB measured | error | s/step plan | s/step measured | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows_p, rows_m, mem_p, mem_m, t_p, t_m in table:
        print(f"| {name} | {rows_p} / {rows_m} | {mem_p:.2f} | {mem_m:.2f} | {100 * (mem_p / mem_m - 1):+.0f}% | "
              f"{t_p:.2f} | {t_m:.2f} | {100 * (t_p / t_m - 1):+.0f}% |")


if __name__ == "__main__":
    main()
