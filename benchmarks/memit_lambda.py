"""M-MEMIT on the demo backbone: Reliability and Locality against lambda (mom2_update_weight).

    python benchmarks/memit_lambda.py --groups 0:8 --lambdas 15000,3000,1000,300 --out runs/memit_lambda

Per group (edit one, test one; MzsRE dev en+zh), every language's target z at the last edit
layer's residual is optimised once on the unedited model (``compute_z``, configs/methods/memit-demo.yaml),
then spread over layers 4-8 (MEMIT's layer loop, :func:`lafn_lightning.methods.memit.spread`) for
each lambda, in two ways: ``sequential`` (one language after the other, each with its own
statistics C_l: what ``MemitHParams(joint_languages=False)`` does) and ``joint`` (all languages in one least-squares
solve with the mean of their C_l: ``joint_languages=True``). Each update is scored (teacher-forced
token F1 / EM x100) on the group's probes. Prints one row per (lambda, mode) and writes
``<out>/memit_lambda.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_variants import common_args, report, score, setup  # noqa: E402

from lafn_lightning.methods.compute_z import optimise_values, prefix_groups  # noqa: E402
from lafn_lightning.methods.lowrank import LowRankUpdate  # noqa: E402
from lafn_lightning.methods.memit import MemitHParams, mean_statistics, spread  # noqa: E402
from lafn_lightning.methods.requests import requests_by_language  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, "0:8", "configs/methods/memit-demo.yaml", "runs/memit_lambda")
    ap.add_argument("--lambdas", default="15000,3000,1000,300")
    a = ap.parse_args()
    hp: MemitHParams
    hp, model, tok, groups = setup(a)
    C = {lang: mean_statistics(model, tok, hp, [lang]) for lang in a.languages}
    C_mix = mean_statistics(model, tok, hp, a.languages)
    prefixes = {lang: prefix_groups(model, tok, lang, hp.prefixes) for lang in a.languages}
    z_site = ("residual", hp.layers[-1])
    n = len(hp.layers)
    variants = [(float(lam), mode) for lam in a.lambdas.split(",") for mode in ("sequential", "joint")]
    cells: dict = {v: {} for v in variants}
    log = []
    for g in groups:
        t0 = time.time()
        reqs = [rs[0] for rs in requests_by_language([g], a.languages).values()]
        zs = {}
        for req in reqs:
            [z] = optimise_values(model, tok, req, [z_site], hp.value, prefixes[req.language])
            zs[req.language] = z
        for lam, mode in variants:
            h = dataclasses.replace(hp, mom2_update_weight=lam)
            up = LowRankUpdate()
            quiet = lambda *_: None  # noqa: E731
            if mode == "sequential":
                for req in reqs:
                    writes = [("down", z_site, C[req.language], zs[req.language].target[None])]
                    spread(model, tok, [req], h, prefixes[req.language], writes, up,
                           scale=lambda i: float(n - i), log=quiet)
            else:  # one solve; each request's keys with its own language's prefixes
                writes = [("down", z_site, C_mix, torch.stack([zs[r.language].target for r in reqs]))]
                spread(model, tok, reqs, h, prefixes, writes, up, scale=lambda i: float(n - i), log=quiet)
            for k, v in score(model, tok, g, a.languages, lambda up=up: up.hooks(model)).items():
                cells[(lam, mode)].setdefault(k, []).append(v)
        log.append({"group": g.group_id, "nll": [round(z.final_nll, 3) for z in zs.values()],
                    "seconds": round(time.time() - t0, 1)})
        print(json.dumps(log[-1]), flush=True)
    report({f"{lam:g} {mode}": c for (lam, mode), c in cells.items()}, a.languages,
           Path(a.out) / "memit_lambda.json", {"groups": log}, header="lambda, languages")


if __name__ == "__main__":
    main()
