"""Do the languages of an edit group pull ΔV the same way? Per-language gradients at ΔV = 0.

    python benchmarks/language_gradients.py --groups 0:2            # demo backbone, 12 languages, bf16

For each group and language: the language's mean target loss at ΔV = 0 and the gradient of that
loss w.r.t. the group's masked ΔV (the located neurons of each edited layer). Prints, per group,
the pairwise cosine similarity of the languages' gradients (layers before the last edited one),
each language's gradient norm per layer, and the subject-position rule of its prompts. The
gradient of the first Adam step is the sign of the sum of these: negative cosines mean that
languages pull ΔV in opposite directions.
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

from lafn_lightning.api.settings import LafnCLI, resolve_config
import torch



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="0:2")
    parser.add_argument("--languages", default="null")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset", default=None, help="MzsRE folder (default: the dev records shipped in the package)")
    parser.add_argument("--json", default=None)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    torch.set_num_threads(1)
    from lafn_lightning.editing.locate import locate_group

    cli = LafnCLI(["-c", resolve_config("demo"), "--data.groups", args.groups, "--data.languages",
                    args.languages, "--model.dtype", args.dtype, "--trainer.logger", "false",
                    *(["--data.dataset", args.dataset] if args.dataset else []), *argv[cut + 1:]], run=False)
    module, dm, cfg = cli.model, cli.datamodule, cli.config
    dm.setup("fit")
    module.allocate(len(dm.groups))
    module.lower = None                                            # full forward, no trainer needed
    b = dm.batch
    for k, group in enumerate(dm.groups):
        mask, _ = locate_group(module.backbone, module.adapter, module.layers, module.tokenizer,
                               dm.locating_corpus(group), beta=cfg.locate.beta, strategy=cfg.locate.strategy,
                               seed=cfg.locate.seed + zlib.crc32(group.group_id.encode()))
        module.mask[k] = mask
    languages = list(dm.languages)
    report = {}
    for k, group in enumerate(dm.groups):
        grads, losses = [], []
        for li, lang in enumerate(languages):
            rows = ((b["group"] == k) & (b["language"] == li)).nonzero().squeeze(1)
            tok_nll, row_of = module._answer_token_nll(b, rows)
            n = torch.zeros(len(rows)).index_add(0, row_of, torch.ones_like(tok_nll))
            loss = (torch.zeros(len(rows)).index_add(0, row_of, tok_nll) / n).mean()
            (g,) = torch.autograd.grad(loss, module.delta_v)
            grads.append((g[k] * module.mask[k]).float())
            losses.append(float(loss))
        G = torch.stack(grads)                                     # [languages, layers, d_ff]
        upper = G[:, :-1].flatten(1)
        unit = upper / upper.norm(dim=1, keepdim=True).clamp(min=1e-30)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(languages), dtype=torch.bool)]
        norms = G.norm(dim=-1)                                     # [languages, layers]
        rules = {}
        for lang, edit in group.edits.items():
            from lafn_lightning.editing.prompts import subject_span
            rules[lang] = subject_span(edit.prompt, edit.subject, group.subjects)[2]
        mean_dir = unit.mean(0)
        report[group.index] = {"loss": dict(zip(languages, losses)), "cos": cos.tolist(),
                               "norms": dict(zip(languages, norms.tolist())), "rules": rules,
                               "located": module.mask[k].sum(-1).tolist(),
                               "cos_to_mean": dict(zip(languages, (unit @ (mean_dir / mean_dir.norm())).tolist()))}
        print(f"\ngroup {group.index} ({group.group_id}): located {module.mask[k].sum(-1).tolist()} per layer "
              f"{module.layers}; off-diagonal cosine (layers {module.layers[:-1]}) mean {off.mean():.3f}, "
              f"min {off.min():.3f}, share < 0: {(off < 0).float().mean():.2f}")
        print("| language | rule | loss at ΔV=0 | cos to mean direction | grad norm per layer " + str(module.layers) + " |")
        print("|---|---|---|---|---|")
        for li, lang in enumerate(languages):
            print(f"| {lang} | {rules[lang]} | {losses[li]:.2f} | {report[group.index]['cos_to_mean'][lang]:.2f} | "
                  + ", ".join(f"{v:.2e}" for v in norms[li].tolist()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
