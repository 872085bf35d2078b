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

from rome_variants import score  # noqa: E402

from lafn_lightning.backbone.loading import load_backbone  # noqa: E402
from lafn_lightning.data import default_dataset, load_groups  # noqa: E402
from lafn_lightning.methods.compute_z import optimise_values, prefix_groups  # noqa: E402
from lafn_lightning.methods.lowrank import LowRankUpdate  # noqa: E402
from lafn_lightning.methods.memit import MemitHParams, spread  # noqa: E402
from lafn_lightning.methods.requests import requests_by_language  # noqa: E402
from lafn_lightning.methods.stats import key_second_moments  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="0:8")
    ap.add_argument("--languages", nargs="+", default=["en", "zh"])
    ap.add_argument("--lambdas", default="15000,3000,1000,300")
    ap.add_argument("--config", default="configs/methods/memit-demo.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/memit_lambda")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import yaml
    from lafn_lightning.methods.config import from_config
    hp: MemitHParams = from_config(yaml.safe_load(open(a.config))["method"])
    model, tok = load_backbone("demo", "float32")
    start, _, stop = a.groups.partition(":")
    groups = load_groups(default_dataset(), languages=a.languages, select=slice(int(start), int(stop)))
    C = {lang: key_second_moments(model, tok, hp.layers, lang, n_samples=hp.mom2_n_samples) for lang in a.languages}
    C_mix = {layer: sum(C[lang][layer] for lang in a.languages) / len(a.languages) for layer in hp.layers}
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
                    spread(model, tok, [req], h, prefixes[req.language],
                           [("down", z_site, C[req.language], zs[req.language].target[None])], up, scale=lambda i: float(n - i), log=quiet)
            else:  # one solve; each request's keys with its own language's prefixes
                spread(model, tok, reqs, h, prefixes,
                       [("down", z_site, C_mix, torch.stack([zs[r.language].target for r in reqs]))], up, scale=lambda i: float(n - i), log=quiet)
            for k, v in score(model, tok, g, a.languages, lambda up=up: up.hooks(model)).items():
                cells[(lam, mode)].setdefault(k, []).append(v)
        log.append({"group": g.group_id, "nll": [round(z.final_nll, 3) for z in zs.values()],
                    "seconds": round(time.time() - t0, 1)})
        print(json.dumps(log[-1]), flush=True)
    table = {}
    for v in variants:
        for (m, lang), vals in cells[v].items():
            vals = [x for x in vals if x is not None]
            table.setdefault(f"{v[0]:g} {v[1]}", {})[f"{m}/{lang}"] = [
                round(100 * sum(x[0] for x in vals) / len(vals), 1), round(100 * sum(x[1] for x in vals) / len(vals), 1)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memit_lambda.json").write_text(json.dumps({"argv": sys.argv[1:], "table": table, "groups": log}, indent=1))
    metrics = ("reliability", "generality", "locality", "portability")
    print("| lambda, languages | " + " | ".join(f"{m} F1 {'/'.join(a.languages)}" for m in metrics) + " |")
    for key, row in table.items():
        print(f"| {key} | " + " | ".join(" / ".join(str(row[f'{m}/{lang}'][0]) for lang in a.languages)
                                        for m in metrics) + " |")


if __name__ == "__main__":
    main()
