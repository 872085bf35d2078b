"""Usage: python benchmarks/locate_then_edit.py --method rome|memit|pmet [--groups 0:20] [--languages en zh] ...

Edit MzsRE groups on the demo backbone with one Locate-then-Edit baseline (one request per
language, per-language statistics), save the edit artifact, apply it by hooks and score
Reliability / Generality / Locality / Portability (teacher-forced token F1 and EM, x100) per
language; prints a table and writes ``<out>/<method>.results.json`` (with wall times and peak RSS).
"""
import argparse
import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

torch.set_num_threads(1)
from lafn_lightning.evaluation import metrics as M  # noqa: E402
from lafn_lightning.backbone.loading import load_backbone  # noqa: E402
from lafn_lightning.data import load_groups  # noqa: E402
from lafn_lightning.evaluation.protocol import _KeepLogits  # noqa: E402
from lafn_lightning.methods import artifact  # noqa: E402
from lafn_lightning.methods.compute_z import ValueHParams  # noqa: E402
from lafn_lightning.methods.memit import MemitHParams, memit_edit  # noqa: E402
from lafn_lightning.methods.pmet import PmetHParams, pmet_edit  # noqa: E402
from lafn_lightning.methods.requests import requests_by_language  # noqa: E402
from lafn_lightning.methods.rome import RomeHParams, rome_edit  # noqa: E402
from lafn_lightning.methods.stats import key_second_moments  # noqa: E402

from lafn_lightning.data import default_dataset  # noqa: E402
DATA = default_dataset()


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--method", required=True, choices=["rome", "memit", "pmet"])
    p.add_argument("--groups", default="0:20")
    p.add_argument("--languages", nargs="+", default=["en", "zh"])
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--prefixes", type=json.loads, default=None, help='e.g. "[[5,2],[10,2]]"')
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--clamp", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--mom2_update_weight", type=float, default=None)
    p.add_argument("--mom2_n_samples", type=int, default=2000)
    p.add_argument("--no_mom2", action="store_true", help="ROME without C^-1 (EasyEdit's Llama/Qwen default)")
    p.add_argument("--precompute_stats", action="store_true", help="time the statistics apart from the edit")
    p.add_argument("--out", default="runs/lte")
    p.add_argument("--dtype", default="float32")
    return p.parse_args()


def hparams(a):
    if a.method == "rome":
        hp = RomeHParams(layer=(a.layers or [6])[0], prefixes=a.prefixes or [[5, 2], [10, 2]],
                         mom2_adjustment=not a.no_mom2, mom2_n_samples=a.mom2_n_samples)
    elif a.method == "memit":
        hp = MemitHParams(layers=a.layers or [4, 5, 6, 7, 8], prefixes=a.prefixes or [[10, 3]],
                          mom2_n_samples=a.mom2_n_samples)
    else:
        hp = PmetHParams(layers=a.layers or [4, 5, 6, 7, 8], prefixes=a.prefixes or [[10, 3]],
                         mom2_n_samples=a.mom2_n_samples)
    v: ValueHParams = hp.value
    for name, key in (("steps", "v_num_grad_steps"), ("lr", "v_lr"), ("clamp", "clamp_norm_factor"),
                      ("weight_decay", "v_weight_decay")):
        if getattr(a, name) is not None:
            setattr(v, key, getattr(a, name))
    if a.mom2_update_weight is not None:
        hp.mom2_update_weight = a.mom2_update_weight
    return hp


def probes(groups, lang):
    out = {}
    for metric, q, t in (("reliability", "prompt", "target"), ("generality", "rephrase", "target"),
                         ("locality", "locality_prompt", "locality_answer"),
                         ("portability", "portability_prompt", "portability_answer")):
        pairs = [(getattr(g.edits[lang], q), getattr(g.edits[lang], t)) for g in groups]
        out[metric] = [p for p in pairs if p[0] and p[1]]
    return out


def predict(model, tok, pairs):
    return M.teacher_forced_predictions(_KeepLogits(model, model), tok, [p for p, _ in pairs], [t for _, t in pairs])


def main():
    a = parse()
    start, _, stop = a.groups.partition(":")
    model, tok = load_backbone("demo", a.dtype)
    groups = load_groups(DATA, languages=a.languages, select=slice(int(start), int(stop)))
    requests = requests_by_language(groups, a.languages)
    hp = hparams(a)
    layers = [hp.layer] if a.method == "rome" else hp.layers
    t0 = time.time()
    if a.precompute_stats:  # else computed inside the edit when missing (cached on disk either way)
        for lang in a.languages if not (a.method == "rome" and a.no_mom2) else []:
            key_second_moments(model, tok, layers, lang, n_samples=a.mom2_n_samples)
    stats_s = time.time() - t0
    t0 = time.time()
    edit = {"rome": rome_edit, "memit": memit_edit, "pmet": pmet_edit}[a.method]
    update = edit(model, tok, requests, hp)
    edit_s = time.time() - t0
    out = Path(a.out)
    tag = f"{a.method}"
    path = artifact.save_artifact(update, out / tag, model=model, method=a.method, hparams=asdict(hp),
                                  requests=[r for rs in requests.values() for r in rs],
                                  extra={"groups": a.groups, "languages": a.languages})
    t0 = time.time()
    table = {}
    for lang in a.languages:
        pr = probes(groups, lang)
        base = {m: predict(model, tok, pairs) for m, pairs in pr.items()}
        handle = artifact.apply_artifact(model, path)
        try:
            after = {m: predict(model, tok, pairs) for m, pairs in pr.items()}
        finally:
            handle.remove()
        for m in pr:
            if m == "locality":
                f1, em = M.score_predictions(tok, [p for p, _ in after[m]], [p for p, _ in base[m]])
            else:
                f1, em = M.score_predictions(tok, [p for p, _ in after[m]], [g for _, g in after[m]])
                f0, e0 = M.score_predictions(tok, [p for p, _ in base[m]], [g for _, g in base[m]])
                table.setdefault(m, {}).setdefault(lang, {})["pre_f1"] = round(100 * sum(f0) / len(f0), 1)
            cell = table.setdefault(m, {}).setdefault(lang, {})
            cell.update(f1=round(100 * sum(f1) / len(f1), 1), em=round(100 * sum(em) / len(em), 1), n=len(f1))
    eval_s = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"method": a.method, "groups": a.groups, "languages": a.languages, "hparams": asdict(hp),
              "artifact": str(path), "ranks": {str(l): update.factors[l][0].shape[0] for l in update.layers},
              "stats_s": round(stats_s, 1), "edit_s": round(edit_s, 1), "eval_s": round(eval_s, 1),
              "peak_rss_mb": round(peak_mb), "scores": table, "argv": sys.argv[1:]}
    (out / f"{tag}.results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "hparams"}, indent=1))
    print("| metric | " + " | ".join(a.languages) + " |")
    for m, row in table.items():
        print(f"| {m} | " + " | ".join(f"{row[l]['f1']} / {row[l]['em']}" for l in a.languages) + " |")


if __name__ == "__main__":
    main()
