"""LU-LAFNs' own ablations (paper Tables 4, 5 and 6: layers, beta, locating strategy) through `lafn evaluate`.

    python benchmarks/ablations.py runs/ablations --groups 0:5 --languages en,zh --threads 1
    python benchmarks/ablations.py runs/ablations --tables beta          # one table

Each setting is one ``lafn evaluate -c CONFIG --data.groups G --data.languages L --generation false``
process with the setting's overrides (the config's own values are the reference row, run once and
shared by the three tables), run one after the other with its wall time and peak RSS; results are
reused when the command is run again. Prints one table per ablation (teacher-forced F1 / EM per
language, edit one test one) and writes OUT/ablations.md. The paper's "No-PGs" row is the
project's default here: the demo locates on the edit question alone (paraphrases need
`lafn paraphrase` with an instruct model or endpoint, docs/paraphrase.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from compare_methods import METRICS, cell, run

#: table -> [(row label, name of the run, overrides)]; "reference" is the config itself
TABLES = {
    "layers": [("5, 6, 7, 17 (config)", "reference", []),
               ("5, 6, 7, 8", "layers_5-8", ["--model.layers", "[5,6,7,8]"]),
               ("10, 11, 12, 17", "layers_10-12_17", ["--model.layers", "[10,11,12,17]"])],
    "beta": [("0.3 (config)", "reference", []),
             ("0.1", "beta_0.1", ["--locate.beta", "0.1"]),
             ("0.5", "beta_0.5", ["--locate.beta", "0.5"])],
    "strategy": [("LAFN (config; No-PGs: no paraphrases)", "reference", []),
                 ("All neurons of the layers", "strategy_all", ["--locate.strategy", "all"]),
                 ("Random (as many as LAFN)", "strategy_random", ["--locate.strategy", "random"])],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--groups", default="0:5")
    ap.add_argument("--languages", default="en,zh", help="comma-separated, or null for every language")
    ap.add_argument("--tables", default=",".join(TABLES))
    ap.add_argument("--threads", type=int, default=None, help="OMP/torch threads per process (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    langs = "null" if args.languages == "null" else "[" + args.languages + "]"
    done: dict[str, tuple[dict, float, float] | None] = {}
    tables = [t for t in args.tables.split(",") if t]
    for table in tables:
        for _, name, overrides in TABLES[table]:
            if name in done:
                continue
            d = out / name
            d.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "lafn_lightning.cli", "evaluate", "-c", args.config, "--data.groups",
                   args.groups, "--data.languages", langs, "--generation", "false", "--cache_dir", str(d / "cache"),
                   "--output", str(d / "results.json"), "--trainer.logger", "false", *overrides]
            print(f"[ablations] {name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            code, wall, rss = run(cmd, d / "log.txt", args.threads)
            if code != 0:
                print(f"[ablations] {name} failed (exit {code}); see {d / 'log.txt'}", file=sys.stderr)
                done[name] = None
                continue
            done[name] = (json.loads((d / "results.json").read_text()), wall, rss)
            print(f"[ablations] {name}: {wall:.0f} s, peak RSS {rss:.2f} GiB", file=sys.stderr, flush=True)
    lines = []
    for table in tables:
        rows = [(label, done[name]) for label, name, _ in TABLES[table] if done.get(name)]
        if not rows:
            continue
        languages = rows[0][1][0]["meta"]["languages"]
        cols = [*languages, "avg"]
        lines += [f"### {table} (groups {args.groups}, languages {','.join(languages)}, config {args.config})", "",
                  f"| {table} | " + " | ".join(f"{m.title()} {c}" for m in METRICS for c in cols) + " | wall |",
                  "|---|" + "---|" * (len(METRICS) * len(cols) + 1)]
        for label, (results, wall, _) in rows:
            block = results["edit_one_test_one"]
            lines.append(f"| {label} | " + " | ".join(cell(block, m, c) for m in METRICS for c in cols)
                         + f" | {wall / 60:.1f} min |")
        lines.append("")
    text = "\n".join(lines)
    (out / "ablations.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
