"""Why M-PMET misses 90 F1 on the demo backbone: the attention delta's share, which matrices it
writes, lambda, languages.

    python benchmarks/pmet_variants.py --groups 0:8 --lambdas 15000,1000 --out runs/pmet_variants
    python benchmarks/pmet_variants.py --groups 0:8 --clamps 1/1,1/4,0/4 --lambdas 1000 --rewrites down

Per group (edit one, test one; MzsRE dev, en+zh by default) and pair of norm clamps, every
language's attention and FFN targets at the last edit layer are optimised once, jointly, on the
unedited model (PMET's ``compute_zs``; the value hyper-parameters of
configs/methods/pmet-demo.yaml, with ``--clamps attn/ffn,...``: ``attn_clamp_norm_factor`` /
``value.clamp_norm_factor``; 0 for the attention leaves the whole edit to the FFN delta), then
spread over layers 4-8
(:func:`lafn_lightning.methods.memit.spread`, PMET's sqrt(layers left) scaling) in each
combination of:

- ``rewrite``: ``down`` (PMET: the FFN target only; the attention target is discarded) or
  ``down+o_proj`` (the attention target also written into the attention output projection, with
  the o_proj inputs' own statistics: EasyEdit's ``rewrite_module_tmps`` with both modules);
- ``lambda`` (``mom2_update_weight``);
- ``sequential`` (one language after the other, each with its own statistics) or ``joint`` (one
  solve, the mean of the languages' statistics).

Each update is scored (teacher-forced token F1 / EM x100, the project's protocol) on the
group's probes. Prints one row per variant and writes ``<out>/pmet_variants.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_variants import common_args, report, score, setup  # noqa: E402

from lafn_lightning.methods.compute_z import optimise_values, prefix_groups  # noqa: E402
from lafn_lightning.methods.lowrank import LowRankUpdate  # noqa: E402
from lafn_lightning.methods.memit import mean_statistics, spread  # noqa: E402
from lafn_lightning.methods.pmet import PmetHParams, residual_targets  # noqa: E402
from lafn_lightning.methods.requests import requests_by_language  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(ap, "0:8", "configs/methods/pmet-demo.yaml", "runs/pmet_variants")
    ap.add_argument("--lambdas", default="15000,1000")
    ap.add_argument("--rewrites", default="down,down+o_proj")
    ap.add_argument("--rules", default="pmet",
                    help="pmet: R = (z_ffn - current FFN output) / sqrt(layers left); residual: the FFN "
                         "target's change as a target for the last edit layer's residual output, "
                         "spread by MEMIT's rule (rewrite down only)")
    ap.add_argument("--layer-sets", default=None, help="e.g. 4-8,8 (default: the config's layers)")
    ap.add_argument("--modes", default="sequential,joint")
    ap.add_argument("--clamps", default=None,
                    help="attention/FFN norm-clamp pairs, comma-separated (default: the config's)")
    a = ap.parse_args()
    hp: PmetHParams
    hp, model, tok, groups = setup(a)
    z_layer = hp.layers[-1]
    sites = {"down": ("down", z_layer), "o_proj": ("attn", z_layer)}
    C = {(m, lang): mean_statistics(model, tok, hp, [lang], module=m) for m in sites for lang in a.languages}
    C_mix = {m: mean_statistics(model, tok, hp, a.languages, module=m) for m in sites}
    prefixes = {lang: prefix_groups(model, tok, lang, hp.prefixes) for lang in a.languages}
    clamps = ([tuple(float(x) for x in c.split("/")) for c in a.clamps.split(",")] if a.clamps
              else [tuple(hp.clamps)])
    layer_sets = ([tuple(range(int(x.split("-")[0]), int(x.split("-")[-1]) + 1)) for x in a.layer_sets.split(",")]
                  if a.layer_sets else [tuple(hp.layers)])
    if any(ls[-1] != z_layer for ls in layer_sets):
        raise SystemExit(f"--layer-sets: every set must end at the config's last layer {z_layer}")
    variants = [(c, ls, rule, rw, float(lam), mode) for c in clamps for ls in layer_sets for rule in a.rules.split(",")
                for rw in a.rewrites.split(",") for lam in a.lambdas.split(",") for mode in a.modes.split(",")
                if rule == "pmet" or rw == "down"]
    cells: dict = {v: {} for v in variants}
    log = []
    quiet = lambda *_: None  # noqa: E731
    for g in groups:
        t0 = time.time()
        reqs = [rs[0] for rs in requests_by_language([g], a.languages).values()]
        zs = {c: {} for c in clamps}
        for c in clamps:
            for req in reqs:
                z_attn, z_ffn = optimise_values(model, tok, req, [sites["o_proj"], sites["down"]], hp.value,
                                                prefixes[req.language], clamp=c)
                zs[c][req.language] = {"o_proj": z_attn, "down": z_ffn}
            z_res = residual_targets(model, tok, reqs, z_layer, torch.stack([zs[c][r.language]["down"].target
                                                                             for r in reqs]))
            for req, z in zip(reqs, z_res):
                zs[c][req.language]["residual"] = z
        for v in variants:
            c, ls, rule, rw, lam, mode = v
            h = dataclasses.replace(hp, mom2_update_weight=lam, layers=list(ls))
            n = len(ls)
            modules = rw.split("+")
            up = LowRankUpdate()
            batches = [[r] for r in reqs] if mode == "sequential" else [reqs]
            for batch in batches:
                stats = (lambda m: C[(m, batch[0].language)]) if mode == "sequential" else (lambda m: C_mix[m])
                if rule == "residual":
                    z_res = torch.stack([zs[c][r.language]["residual"] for r in batch])
                    writes = [("down", ("residual", z_layer), stats("down"), z_res)]
                    spread(model, tok, batch, h, prefixes, writes, up, scale=lambda i: float(n - i), log=quiet)
                    continue
                writes = [(m, sites[m], stats(m), torch.stack([zs[c][r.language][m].target for r in batch]))
                          for m in modules]
                spread(model, tok, batch, h, prefixes, writes, up, scale=lambda i: math.sqrt(n - i), log=quiet)
            for k, val in score(model, tok, g, a.languages, lambda up=up: up.hooks(model)).items():
                cells[v].setdefault(k, []).append(val)
        log.append({"group": g.group_id, "seconds": round(time.time() - t0, 1)} | {
            "clamps {:g}/{:g}".format(*c): {
                "nll": {lang: round(z["down"].final_nll, 3) for lang, z in zs[c].items()},
                "|d_attn|": {lang: round(float(z["o_proj"].delta.norm()), 2) for lang, z in zs[c].items()},
                "|d_ffn|": {lang: round(float(z["down"].delta.norm()), 2) for lang, z in zs[c].items()}}
            for c in clamps})
        print(json.dumps(log[-1], ensure_ascii=False), flush=True)
    report({"clamps {:g}/{:g}, ".format(*c) + f"L{ls[0]}-{ls[-1]} {rule}, {rw} {lam:g} {mode}": cell
            for (c, ls, rule, rw, lam, mode), cell in cells.items()},
           a.languages, Path(a.out) / "pmet_variants.json", {"groups": log},
           header="attention/FFN clamps, layers and rule, rewrite, lambda, languages")


if __name__ == "__main__":
    main()
