"""Which layer's mean-pooled hidden states retrieve ReMaKE facts best (demo backbone)?

    OMP_NUM_THREADS=1 python benchmarks/remake_layers.py --groups 0:20 --languages en,zh --distractors 1000

The threshold per layer is calibrated on zsRE training facts only (methods.remake.calibrate);
the dev probes are used only to report how each layer does: rephrase -> own edit (top-1, same
and other language), share of rephrase/portability queries above threshold, share of locality
queries above threshold (each one would get a context and may change its prediction).
"""
import argparse, json
import torch
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.data import load_groups
from lafn_lightning.data import default_dataset
from lafn_lightning.methods.remake import embed, read_zsre_train

ap = argparse.ArgumentParser()
ap.add_argument("--groups", default="0:20"); ap.add_argument("--languages", default="en,zh")
ap.add_argument("--distractors", type=int, default=1000); ap.add_argument("--held_out", type=int, default=200)
ap.add_argument("--out", default=None)
a = ap.parse_args()
torch.set_num_threads(1)
langs = a.languages.split(",")
model, tok = load_backbone("demo", "float32")
groups = load_groups(default_dataset(), languages=langs, select=a.groups)
texts, kind = [], []          # kind: (role, lang, group index)
for gi, g in enumerate(groups):
    for x in langs:
        e = g.edits[x]
        for role, t in (("edit", e.prompt), ("rephrase", e.rephrase), ("locality", e.locality_prompt), ("portability", e.portability_prompt)):
            texts.append(t); kind.append((role, x, gi))
for x in langs:
    facts = read_zsre_train(x, a.distractors + a.held_out)
    for i, (q, _) in enumerate(facts):
        texts.append(q); kind.append(("distractor" if i < a.distractors else "held_out", x, i))
n_layers = model.config.num_hidden_layers
E = embed(model, tok, texts, list(range(n_layers)))
report = {}
idx = lambda role, x=None: [i for i, k in enumerate(kind) if k[0] == role and (x is None or k[1] == x)]
for center in (True, False):
    for L in range(n_layers):
        raw = E[L]
        mean = raw[idx("distractor")].mean(0) if center else torch.zeros(raw.shape[1])
        Z = torch.nn.functional.normalize(raw - mean, dim=-1)
        kb = {x: idx("edit", x) + idx("distractor", x) for x in langs}
        def top(qi, x):
            s = Z[qi] @ Z[kb[x]].T
            v, j = s.max(1)
            return v, [kb[x][int(t)] for t in j]
        # calibration from zsRE only
        ho = {x: idx("held_out", x) for x in langs}
        neg = torch.cat([top(ho[x], x)[0] for x in langs])
        pos = torch.cat([(Z[ho[x]] * Z[ho[y]]).sum(1) for x in langs for y in langs if x != y])
        n95, n99, p50 = neg.quantile(.95).item(), neg.quantile(.99).item(), pos.median().item()
        thr = (n95 + p50) / 2 if p50 > n95 else n99
        row = {"threshold": thr, "neg_p95": n95, "pos_p50": p50}
        for role in ("rephrase", "portability", "locality"):
            for qx in langs:
                q = idx(role, qx)
                for kx in langs:
                    v, j = top(q, kx)
                    correct = [kind[t][0] == "edit" and kind[t][2] == kind[qi][2] for t, qi in zip(j, q)]
                    row[f"{role}:{qx}->{kx}:top1_own"] = sum(correct) / len(q)
                    row[f"{role}:{qx}->{kx}:above"] = (v >= thr).float().mean().item()
                    row[f"{role}:{qx}->{kx}:own_above"] = sum(c and s >= thr for c, s in zip(correct, v.tolist())) / len(q)
        report[f"{'centred' if center else 'raw'}:{L}"] = row
        keys = [k for k in row if k.startswith("rephrase") and k.endswith("own_above")] + [k for k in row if k.startswith("locality") and k.endswith(":above")]
        print(f"{'centred' if center else 'raw'} L{L:2d} thr {thr:.3f} (neg95 {n95:.3f} pos50 {p50:.3f}) "
              + " ".join(f"{k.split(':')[0][:3]}:{k.split(':')[1]}:{row[k]:.2f}" for k in keys), flush=True)
if a.out:
    open(a.out, "w").write(json.dumps(report, indent=1))
