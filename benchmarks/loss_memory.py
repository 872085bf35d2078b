"""Peak memory of the answer-token loss alone: full-vocabulary logits vs the chunked loss.

    python benchmarks/loss_memory.py --tokens 512          # demo LM head (262k x 640), fp32

For each mode, a fresh process loads only the demo backbone's LM-head weight, draws ``--tokens``
hidden states, computes the token cross-entropy and its gradient w.r.t. the hidden states, and
reports its peak resident memory above the memory it held before the loss (``ru_maxrss``).
``full`` is the edit loop before the chunked loss (bf16 logits, ``.float()``, ``F.cross_entropy``);
``chunked`` is :func:`lafn_lightning.editing.chunked_loss.chunked_token_nll`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def child(mode: str, tokens: int, weight_file: str) -> None:
    torch.set_num_threads(1)
    weight = torch.load(weight_file)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, weight.shape[1], generator=gen).to(weight.dtype).requires_grad_()
    gold = torch.randint(0, weight.shape[0], (tokens,), generator=gen)
    held = _rss_gb()
    t = time.perf_counter()
    if mode == "full":
        nll = F.cross_entropy(F.linear(hidden, weight).float(), gold, reduction="none")   # the LM head
    else:
        from lafn_lightning.editing.chunked_loss import chunked_token_nll
        nll = chunked_token_nll(hidden, weight, gold)
    nll.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"mode": mode, "tokens": tokens, "vocab": weight.shape[0], "held_gb": held, "peak_gb": peak,
                      "loss_peak_gb": peak - held, "seconds": time.perf_counter() - t, "loss": float(nll.mean())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", help="LM-head dtype (bfloat16 is the GPU setting)")
    parser.add_argument("--weight", default=None, help="default: lafn_demo_lm_head_DTYPE.pt in the temporary directory")
    parser.add_argument("--modes", default="full,chunked")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    args.weight = args.weight or str(Path(tempfile.gettempdir()) / f"lafn_demo_lm_head_{args.dtype}.pt")
    if args.child:
        return child(args.child, args.tokens, args.weight)
    if not Path(args.weight).exists():
        from lafn_lightning.backbone.loading import load_backbone

        model, _ = load_backbone("demo", args.dtype)
        torch.save(model.get_output_embeddings().weight.detach().clone(), args.weight)
        del model
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--weight", args.weight, "--dtype", args.dtype,
                              "--child", mode], capture_output=True, text=True, env=os.environ)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        r = json.loads(line[-1]) if line else {"mode": mode, "error": out.stderr[-500:]}
        print(f"[loss memory] {json.dumps(r)}", flush=True)


if __name__ == "__main__":
    main()
