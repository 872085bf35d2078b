"""Where ``model.optimizer lbfgs`` spends its steps: per group and step, the loss, the step's g·d and
the decrease it brought, recorded around ``GroupLBFGS.step`` during one ``lafn fit``.

    python benchmarks/lbfgs_steps.py runs/lbfgs_steps.jsonl -- -c demo -c presets/twelve_languages \\
        --model.dtype float32 --data.groups 8:12 --model.optimizer lbfgs --cache_dir runs/lbfgs_steps/cache

Printed per group: steps, and over the steps of its second half the median of (actual decrease) / (-g·d).
0.5 is what the exact minimum of a quadratic along the step gives; near 1 the step is too short
(the loss falls linearly along it), near 0 too long. The JSONL holds one line per step:
``{"loss": [...], "gd": [...], "move": [...]}`` (per group; ``move``: the step's largest element).
"""
from __future__ import annotations

import json
import statistics
import sys


def summarise(lines: list[dict]) -> list[dict]:
    """Per group: steps taken and the median decrease ratio over its second half."""
    out = []
    for g in range(len(lines[0]["loss"])):
        ratios = []
        moved = [i for i, r in enumerate(lines[:-1]) if r["gd"][g] < 0]
        for i in moved[len(moved) // 2:]:
            drop = lines[i]["loss"][g] - lines[i + 1]["loss"][g]
            ratios.append(drop / -lines[i]["gd"][g])
        out.append({"group": g, "steps": len(moved), "median_ratio": statistics.median(ratios) if ratios else None})
    return out


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit(__doc__)
    out_path, fit_args = sys.argv[1], sys.argv[3:]
    from lafn_lightning.editing.quasi_newton import GroupLBFGS

    lines, step = [], GroupLBFGS.step

    def recorded(self, closure=None):
        x = self.param_groups[0]["params"][0]
        before = x.detach().clone()
        result = step(self, closure)
        move = (x.detach() - before).reshape(x.shape[0], -1).float()
        grad = x.grad.detach().reshape(x.shape[0], -1).float()
        lines.append({"loss": self.group_loss().float().tolist(), "gd": (grad * move).sum(1).tolist(),
                      "move": move.abs().amax(1).tolist()})
        return result

    GroupLBFGS.step = recorded
    from lafn_lightning.cli import main as lafn

    sys.argv = ["lafn", "fit", *fit_args]
    try:
        lafn()
    except SystemExit as e:
        if e.code:
            raise
    with open(out_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    for row in summarise(lines):
        ratio = "-" if row["median_ratio"] is None else f"{row['median_ratio']:.2f}"
        print(f"group {row['group']}: {row['steps']} steps, median decrease / -g.d over the second half {ratio}")


if __name__ == "__main__":
    main()
