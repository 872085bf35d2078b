"""Score LoRA-FT or ReMaKE on MzsRE groups (edit one group, test it), teacher-forced F1/EM per language.

    OMP_NUM_THREADS=1 python benchmarks/baseline_methods.py --method lora_ft --groups 0:20 --languages en,zh \
        --out runs/baselines/lora_ft        # -> results.json, per-group predictions, artifacts
    python benchmarks/baseline_methods.py --method remake --groups 0:20 --languages en,zh --out runs/baselines/remake

Protocol of lafn_lightning.evaluation.score_group (teacher-forced view): Reliability, Generality,
Portability against the gold answers, Locality = edited vs unedited predictions.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from lafn_lightning.evaluation import metrics as M
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.data import load_groups
from lafn_lightning.data import default_dataset
from lafn_lightning.evaluation.protocol import group_probes


def score(tok, probes, base, edited) -> list[dict]:
    rows = []
    for p, (pred, gold), (ref, _) in zip(probes, edited, base):
        loc = p.metric == "locality"
        if loc:
            f1, em = M.locality_scores(pred, ref, tok)
        else:
            f1s, ems = M.score_predictions(tok, [pred], [gold])
            f1, em = f1s[0], ems[0]
        rows.append({"metric": p.metric, "language": p.language, "f1": f1, "em": em,
                     "prediction": tok.decode(pred, skip_special_tokens=True)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=("lora_ft", "remake"), required=True)
    ap.add_argument("--backbone", default="demo")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--groups", default="0:20")
    ap.add_argument("--languages", default="en,zh")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    # LoRA-FT
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--stop_loss", type=float, default=None)
    ap.add_argument("--target_modules", default=None, help="comma-separated (default: FFN up/down)")
    # ReMaKE
    ap.add_argument("--kb_distractors", type=int, default=2000)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--calibration_groups", default=None, help="records (e.g. 50:80) whose rephrase/locality "
                    "questions calibrate the threshold; never the evaluated ones")
    ap.add_argument("--calibration", type=int, default=200, help="zsRE facts kept out of the KB to calibrate")
    ap.add_argument("--template", default="plain", choices=("plain", "qa"))
    ap.add_argument("--kb", default=None, help="reuse a saved knowledge base (its groups must cover --groups)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    langs = [x.strip() for x in args.languages.split(",")]
    groups = load_groups(args.dataset or default_dataset(), languages=langs, select=args.groups)
    model, tok = load_backbone(args.backbone, args.dtype)
    records, timings = [], defaultdict(float)
    t_all = time.perf_counter()
    if args.method == "lora_ft":
        import lightning as L

        from lafn_lightning.methods.lora_ft import EditQuestionsData, LoRAFineTune, applied_lora

        for g in groups:
            probes = group_probes(g, langs)
            prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
            t0 = time.perf_counter()
            base = M.teacher_forced_predictions(model, tok, prompts, targets)
            timings["score_s"] += time.perf_counter() - t0
            art = out / "artifacts" / g.group_id
            module = LoRAFineTune(backbone=args.backbone, dtype=args.dtype, rank=args.rank, alpha=args.alpha,
                                  dropout=args.dropout, lr=args.lr, artifact_dir=str(art), stop_loss=args.stop_loss,
                                  target_modules=args.target_modules.split(",") if args.target_modules else None)
            t0 = time.perf_counter()
            L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(
                module, datamodule=EditQuestionsData(edit_groups=[g], backbone=args.backbone, dtype=args.dtype))
            timings["edit_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with applied_lora(model, art):
                edited = M.teacher_forced_predictions(model, tok, prompts, targets)
            timings["score_s"] += time.perf_counter() - t0
            rows = score(tok, probes, base, edited)
            records.append({"group_id": g.group_id, "rows": rows, "steps": module.steps_run,
                            "final_loss": float(module.trainer.callback_metrics["loss"])})
            rel = [r["f1"] for r in rows if r["metric"] == "reliability"]
            print(g.group_id, "steps", module.steps_run, "reliability F1", [round(x, 2) for x in rel], flush=True)
    else:
        from lafn_lightning.methods.remake import KnowledgeBase, ReMaKE

        t0 = time.perf_counter()
        if args.kb:
            kb = KnowledgeBase.load(args.kb, model)
            missing = {g.group_id for g in groups} - set(kb.group_ids)
            assert not missing, f"{args.kb} lacks groups {sorted(missing)}"
        calib = [] if args.kb else load_groups(args.dataset or default_dataset(), languages=langs, select=args.calibration_groups) \
            if args.calibration_groups else []
        assert not {g.group_id for g in calib} & {g.group_id for g in groups}, "calibration groups are evaluated"
        if not args.kb:
            kb = KnowledgeBase.build(model, tok, groups, langs, distractors=args.kb_distractors, layer=args.layer,
                                     calibration=0 if calib else args.calibration, calibration_groups=calib,
                                     threshold=args.threshold)
            kb.save(out / "kb")
        timings["edit_s"] += time.perf_counter() - t0
        remake = ReMaKE(model, tok, kb, threshold=args.threshold, template=args.template)
        for g in groups:
            probes = group_probes(g, langs)
            prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
            t0 = time.perf_counter()
            base = M.teacher_forced_predictions(model, tok, prompts, targets)
            contexts = remake.prompts(prompts, groups=[g.group_id])
            edited = M.teacher_forced_predictions(model, tok, contexts, targets)
            timings["score_s"] += time.perf_counter() - t0
            rows = score(tok, probes, base, edited)
            for r, c, p in zip(rows, contexts, prompts):
                r["context"] = c[: len(c) - len(p)]
            records.append({"group_id": g.group_id, "rows": rows})
    table = defaultdict(lambda: defaultdict(list))
    for rec in records:
        for r in rec["rows"]:
            table[r["metric"]][r["language"]].append((r["f1"], r["em"]))
    summary = {m: {l: {"f1": 100 * sum(x for x, _ in v) / len(v), "em": 100 * sum(y for _, y in v) / len(v), "n": len(v)}
                   for l, v in row.items()} for m, row in table.items()}
    result = {"method": args.method, "args": vars(args), "groups": [g.group_id for g in groups], "summary": summary,
              "timings_s": {**timings, "total_s": time.perf_counter() - t_all}, "records": records}
    if args.method == "remake":
        result["retrieval"] = remake.stats()
    (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for m in M.METRICS:
        if m in summary:
            print(f"{m:12s}", "  ".join(f"{l}: {c['f1']:.1f} / {c['em']:.1f}" for l, c in summary[m].items()))
    print("timings", result["timings_s"])


if __name__ == "__main__":
    main()
