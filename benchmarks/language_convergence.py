"""Per-language convergence of a multilingual edit batch: losses per step, converged share, reliability.

    python benchmarks/language_convergence.py OUT --groups 0:6                     # demo, 12 languages, paper settings
    python benchmarks/language_convergence.py OUT --groups 0:6 --name every -- --model.stop_rule every_language

Runs ``lafn fit`` (configs/demo.yaml, bf16, all languages unless ``--languages``) on the groups,
records every group's mean target loss per language at every step, then scores teacher-forced
Reliability (token F1 / EM x100 of edit question -> new answer, all the groups cached, exact
matcher unless ``--matcher``) per language. Prints a per-language table and writes
``OUT/NAME.json`` (trajectories, masks, subject-position rules, timings). Anything after ``--``
goes to ``lafn fit`` unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
from lafn_lightning.api.settings import LafnCLI, resolve_config
import torch



class LanguageRecorder(L.Callback):
    """Every step: each group's per-language mean target loss (NaN once the group has stopped) and
    the ΔV that step's loss was computed with."""

    def __init__(self) -> None:
        self.steps: list[list[list[float]]] = []
        self.deltas: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.deltas.append(pl_module.effective_delta().detach().float().cpu().clone())

    def on_train_end(self, trainer, pl_module) -> None:
        self.deltas.append(pl_module.effective_delta().detach().float().cpu().clone())  # after the last update

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        loss = pl_module.final_language_loss.clone()
        active_before = pl_module.steps == (len(self.steps) + 1)       # groups that ran this step
        loss[~active_before] = float("nan")
        self.steps.append(loss.cpu().tolist())


def replay(recorder: LanguageRecorder, stop_loss: float, rule: str, budget: int) -> tuple[list[int], list[int]]:
    """Per group: the step whose ΔV ``rule`` (``mean``/``every_language``) would have kept with a
    ``budget``-step limit (index into ``recorder.deltas``) and whether it converged. Valid for
    rules no stricter than the recorded run's (the run must not have stopped a group earlier)."""
    loss = torch.tensor(recorder.steps)                              # [steps, groups, languages]
    value = loss.nanmean(-1) if rule == "mean" else loss.nan_to_num(-1).amax(-1)
    value[torch.isnan(loss).all(-1)] = float("nan")
    picks, converged = [], []
    for g in range(loss.shape[1]):
        hit = [s for s in range(min(budget, loss.shape[0])) if value[s, g] < stop_loss]
        picks.append(hit[0] if hit else min(budget, loss.shape[0]))
        converged.append(bool(hit))
    return picks, converged


def write_replay(module, dm, recorder: LanguageRecorder, picks: list[int], cache: Path) -> None:
    from lafn_lightning.backbone.fingerprint import fingerprint
    from lafn_lightning.cache import CacheEntry, write_shard

    entries = []
    for k, group in enumerate(dm.groups):
        delta = recorder.deltas[min(picks[k], len(recorder.deltas) - 1)][k]
        entries.append(CacheEntry(group_id=group.group_id, subjects={l: e.subject for l, e in group.edits.items()},
                                  layers=tuple(module.layers), mask=module.mask[k].cpu(), delta=delta,
                                  meta={"steps": picks[k] + 1}))
    write_shard(cache, entries, fingerprint(module.backbone, module.layers))


def reliability_by_language(groups, languages, cache_dir: Path, backbone: str, dtype: str, matcher: str) -> dict:
    """Per language: teacher-forced token F1 and EM (x100) of every edit question with all edits cached."""
    from lafn_lightning import EditedModel
    from lafn_lightning.evaluation.metrics import score_predictions, teacher_forced_predictions

    em = EditedModel.from_cache(cache_dir, backbone=backbone, dtype=dtype, matcher=matcher)
    out = {}
    for lang in languages:
        edits = [g.edits[lang] for g in groups if lang in g.edits]
        pairs = teacher_forced_predictions(em, em.tokenizer, [e.prompt for e in edits], [e.target for e in edits])
        f1, exact = score_predictions(em.tokenizer, [p for p, _ in pairs], [r for _, r in pairs])
        out[lang] = {"f1": 100 * sum(f1) / len(f1), "em": 100 * sum(exact) / len(exact), "per_group_f1": f1}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--name", default="paper")
    parser.add_argument("--groups", default="0:6")
    parser.add_argument("--languages", default="null")
    parser.add_argument("--config", default="demo", help="a config file or shipped config name")
    parser.add_argument("--dataset", default=None, help="MzsRE folder (default: the dev records shipped in the package)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--matcher", default="exact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replay", default="",
                        help="also score ΔV as other stop rules would have kept it, e.g. 'mean:40,every_language:40' "
                             "(rules no stricter than the run's; same optimisation up to their stop)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.rest = argv[cut + 1:]
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"{args.name}_cache"
    extra = [a for a in args.rest if a != "--"]
    argv = ["-c", resolve_config(args.config), "--data.groups", args.groups, "--data.languages", args.languages,
            "--model.dtype", args.dtype, "--cache_dir", str(cache), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(out), *(["--data.dataset", args.dataset] if args.dataset else []), *extra]
    t0 = time.perf_counter()
    cli = LafnCLI(argv, run=False)
    recorder = LanguageRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - t0
    module, dm = cli.model, cli.datamodule
    languages, groups = list(dm.languages), dm.groups
    stop = module.hparams.stop_loss
    final = module.final_language_loss.cpu()                        # [groups, languages] at each group's last step
    rel = reliability_by_language(groups, languages, cache, module.hparams.backbone, args.dtype, args.matcher)
    every = (final.nan_to_num(-1).amax(1) < stop)
    result = {
        "argv": argv, "fit_seconds": fit_s, "groups": [g.index for g in groups], "languages": languages,
        "stop_loss": stop, "steps": module.steps.tolist(), "stopped": module.stopped.tolist(),
        "converged_every_language": every.tolist(), "final_language_loss": final.tolist(),
        "located": module.mask.sum(-1).tolist(), "rules": {l: dict(c) for l, c in dm.rule_counts.items()},
        "trajectory": recorder.steps, "reliability": rel,
    }
    for spec in filter(None, args.replay.split(",")):
        rule, budget = spec.split(":")
        picks, conv = replay(recorder, stop, rule, int(budget))
        rcache = out / f"{args.name}_replay_{rule}_{budget}_cache"
        write_replay(module, dm, recorder, picks, rcache)
        rrel = reliability_by_language(groups, languages, rcache, module.hparams.backbone, args.dtype, args.matcher)
        result.setdefault("replays", {})[spec] = {"picked_step": picks, "converged": conv, "reliability": rrel}
        print(f"\n[{args.name} replayed as {spec}] converged {sum(conv)}/{len(conv)}, steps {[p + 1 for p in picks]}")
        print("| language | " + " | ".join(languages) + " | mean |")
        print("|---|" + "---|" * (len(languages) + 1))
        for key in ("f1", "em"):
            vals = [rrel[l][key] for l in languages]
            print(f"| {key} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    n = len(groups)
    print(f"\n[{args.name}] {n} groups x {len(languages)} languages, fit {fit_s:.0f} s ({fit_s / n:.1f} s/group, "
          f"shared machine), steps {module.steps.tolist()}, stopped {int(module.stopped.sum())}/{n}, "
          f"every language < {stop}: {int(every.sum())}/{n}")
    print("| language | final loss (mean) | groups < stop | fallback prompts | Reliability F1 | EM |")
    print("|---|---|---|---|---|---|")
    for li, lang in enumerate(languages):
        col = final[:, li]
        print(f"| {lang} | {col.nanmean():.3f} | {int((col < stop).sum())}/{n} | {dm.rule_counts[lang]['fallback']} | "
              f"{rel[lang]['f1']:.1f} | {rel[lang]['em']:.1f} |")
    f1 = sum(r["f1"] for r in rel.values()) / len(rel)
    em = sum(r["em"] for r in rel.values()) / len(rel)
    print(f"| mean | {final.nanmean():.3f} | {int(every.sum())}/{n} (all) | | {f1:.1f} | {em:.1f} |")


if __name__ == "__main__":
    main()
