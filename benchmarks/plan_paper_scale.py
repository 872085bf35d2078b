"""The paper-scale table: ``lafn plan`` for the paper's 7-8B backbones on the whole MzsRE test set.

    python benchmarks/plan_paper_scale.py                       # markdown table on stdout
    python benchmarks/plan_paper_scale.py --steps 63 --steps_enzh 12 --records 743

For Llama-3.1-8B, Qwen2-7B and bloomz-7b1-mt (their architectures: ``random-<name>``, no weights
needed), en+zh and all 12 languages, 1 and 8 GPUs of 80 GB and of 141 GB at ``--mfu`` of a
bf16 peak of ``--peak_tflops`` (989: H100 and H200 dense bf16): the largest edit batch of
``--batches`` whose predicted peak fits the device, its peak, rows per checkpointed forward,
GFLOP per group step and the hours for ``--records`` groups. Token counts are those of the
shipped MzsRE dev records under the demo's Gemma tokenizer (a multilingual tokenizer like the
paper backbones'; ``--tokenizer`` another), scaled from the dev groups to ``--records``. Steps per
group are a prior (``--steps``, ``--steps_enzh``): the demo backbone's measured means (docs/results.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io

from lafn_lightning.api.plan import plan
from lafn_lightning.api.settings import Settings

BACKBONES = {"llama3.1-8b": "[11,12,13,31]", "qwen2-7b": "[19,20,21,27]", "bloomz-7b1-mt": "[9,10,11,29]"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=743, help="MzsRE test records (743)")
    parser.add_argument("--steps", type=float, required=True, help="steps per group, 12 languages (a measured prior)")
    parser.add_argument("--steps_enzh", type=float, required=True, help="steps per group, en+zh (a measured prior)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense matmul peak per GPU")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--batches", default="128,64,32,16,8,4", help="edit batch sizes tried, largest first")
    parser.add_argument("--dev_groups", default="0:150", help="dev groups whose token counts are used")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the demo's, converted once)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from lafn_lightning.backbone.demo import ensure_demo_backbone

        args.tokenizer = str(ensure_demo_backbone())
    print(f"| backbone | languages | GPUs x GB | edit batch (per GPU) | peak GB / GPU | rows per forward | GFLOP per group step | "
          f"steps | minutes ({args.records} groups) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layers in BACKBONES.items():
        for langs, steps in (("[en,zh]", args.steps_enzh), ("null", args.steps)):
            for gpus in (1, 8):
                for gb in (80, 141):
                    chosen = None
                    n_dev = len(range(*[int(x) for x in args.dev_groups.split(":")]))
                    for k in (int(b) for b in args.batches.split(",") if int(b) * gpus <= n_dev):
                        settings = Settings.from_config(name, args=[
                            "--model.backbone", f"random-{name}", "--model.layers", layers, "--model.dtype", "bfloat16",
                            "--data.dataset", "null", "--data.groups", args.dev_groups, "--data.languages", langs,
                            "--trainer.devices", str(gpus), "--trainer.accelerator", "gpu"])
                        with contextlib.redirect_stdout(io.StringIO()):
                            r = plan(settings, edit_batch_size=k * gpus, steps_per_group=steps,
                                     peak_tflops=args.peak_tflops, mfu=args.mfu, device_gb=gb, tokenizer=args.tokenizer)
                        if r["fits"]:
                            chosen = (k, r)
                            break
                    if chosen is None:
                        print(f"| {name} | {langs} | {gpus} x {gb} | none fits | | | | | |")
                        continue
                    k, r = chosen
                    hours = r["hours"] * args.records / r["groups"]
                    rows = "all" if r["max_rows"] is None else r["max_rows"]
                    print(f"| {name} | {'en+zh' if langs != 'null' else '12'} | {gpus} x {gb} | {k} | {r['peak_memory_gb']:.1f} | "
                          f"{rows} | {r['gflop_per_group_step']:.0f} | {steps:g} | {60 * hours:.1f} |", flush=True)


if __name__ == "__main__":
    main()
