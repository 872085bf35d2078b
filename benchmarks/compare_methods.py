"""The paper's method comparison (Table 2 layout) on one backbone: every method through `lafn evaluate`.

    python benchmarks/compare_methods.py runs/compare --groups 0:10 --languages en,zh
    python benchmarks/compare_methods.py runs/compare --methods lu-lafn,memit,lora_ft --languages null  # 12 languages
    python benchmarks/compare_methods.py runs/mono --groups 0:5 -- --mode monolingual   # after --: lafn evaluate options

Each method is one ``lafn evaluate -c CONFIG --data.groups G --data.languages L --generation false``
process (LU-LAFNs: the config's own edit; the others: ``--method methods/<name>-<backbone>``), run
one after the other, each with its wall time and peak RSS (``os.wait4``). Caches, artifacts and
results go under OUT/<method>/ and are reused when the command is run again (resume). Prints the
Table 2 layout (teacher-forced F1 / EM per language for Reliability, Generality, Locality,
Portability; edit_one_test_one for every method, all_cached for LU-LAFNs) and writes OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("lu-lafn", "rome", "memit", "pmet", "lora_ft", "remake")
METRICS = ("reliability", "generality", "locality", "portability")


def run(cmd: list[str], log: Path, threads: int | None = None) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in GiB) of one child process (``threads``: its
    OMP_NUM_THREADS, which torch takes as its thread count)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss / 2**20


def cell(block: dict, metric: str, lang: str) -> str:
    c = block.get(metric, {}).get(lang) or {}
    if c.get("f1") is None:
        return "-"
    return f"{c['f1']:.1f} / {c['em']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--backbone_name", default="demo", help="suffix of configs/methods/<method>-<name>.yaml")
    ap.add_argument("--groups", default="0:10")
    ap.add_argument("--languages", default="en,zh", help="comma-separated, or null for every language")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="OMP/torch threads per process (default: all)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)   # after --: more `lafn evaluate` options
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    langs = "null" if args.languages == "null" else "[" + args.languages + "]"
    rows = {}
    for method in args.methods.split(","):
        d = out / method
        d.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "lafn_lightning.cli", "evaluate", "-c", args.config, "--data.groups", args.groups,
               "--data.languages", langs, "--generation", "false", "--cache_dir", str(d / "cache"),
               "--output", str(d / "results.json"), "--trainer.logger", "false", *extra]
        if method != "lu-lafn":
            cmd += ["--method", f"methods/{method}-{args.backbone_name}"]
        print(f"[compare] {method}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        code, wall, rss = run(cmd, d / "log.txt", args.threads)
        if code != 0:
            print(f"[compare] {method} failed (exit {code}); see {d / 'log.txt'}", file=sys.stderr)
            continue
        results = json.loads((d / "results.json").read_text())
        rows[method] = (results, wall, rss)
        print(f"[compare] {method}: {wall:.0f} s, peak RSS {rss:.2f} GiB", file=sys.stderr, flush=True)

    languages = next(iter(rows.values()))[0]["meta"]["languages"] if rows else []
    cols = [*languages, "avg"]
    lines = [f"Teacher-forced F1 / EM (x100), groups {args.groups}, languages {','.join(languages)}, "
             f"config {args.config}; edit one, test one (LU-LAFNs also with all groups cached).", "",
             "| Method | " + " | ".join(f"{m.title()} {c}" for m in METRICS for c in cols) + " | wall | peak RSS |",
             "|---|" + "---|" * (len(METRICS) * len(cols) + 2)]
    for method, (results, wall, rss) in rows.items():
        settings = [("edit_one_test_one", method)] + ([("all_cached", f"{method} (all cached)")]
                                                       if "all_cached" in results else [])
        for key, label in settings:
            block = results[key]
            lines.append(f"| {label} | " + " | ".join(cell(block, m, c) for m in METRICS for c in cols)
                         + f" | {wall / 60:.1f} min | {rss:.2f} GiB |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
