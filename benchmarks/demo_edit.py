"""Usage: python benchmarks/demo_edit.py OUT_CACHE GROUPS LANGUAGES [lafn fit overrides]

Fit groups on the demo backbone and measure reliability (teacher-forced token accuracy), time, steps."""
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(2)
from lafn_lightning.api.settings import LafnCLI
from lafn_lightning import EditedModel
from lafn_lightning.evaluation.metrics import teacher_forced_predictions
out, groups, langs, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
t = time.time()
cli = LafnCLI(["fit", "-c", str(Path(__file__).resolve().parents[1] / "configs/demo.yaml"), "--cache_dir", out, "--data.groups", groups,
                "--data.languages", langs, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", out, *extra])
fit_s = time.time() - t
m = cli.model
dm = cli.datamodule
em = EditedModel.from_cache(out, backbone=m.hparams.backbone, dtype=m.hparams.dtype)
res = {}
for lang in dm.languages:
    pr = [g.edits[lang].prompt for g in dm.groups]; tg = [g.edits[lang].target for g in dm.groups]
    after = teacher_forced_predictions(em, em.tokenizer, pr, tg)
    hits = sum(p == q for a, b in after for p, q in zip(a, b)); tot = sum(len(b) for _, b in after)
    res[lang] = round(hits / tot, 3)
rules = {l: dict(c) for l, c in dm.rule_counts.items()}
print(json.dumps({"groups": groups, "langs": langs, "extra": extra, "fit_seconds": round(fit_s, 1),
                  "sec_per_group": round(fit_s / len(dm.groups), 1),
                  "steps": m.steps.tolist(), "converged": m.stopped.tolist(), "token_acc": res, "rules": rules}))
