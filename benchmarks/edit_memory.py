"""Peak memory of one edit step per edit-batch size (one process per measurement).

    python benchmarks/edit_memory.py --groups 0:16 --languages null                  # chunked loss (default)
    python benchmarks/edit_memory.py --groups 0:2 --languages null -- --model.chunked_loss false

Runs ``lafn fit`` (configs/demo.yaml, bf16) for ``--steps`` optimisation steps (default 1: the
peak is reached in the first forward/backward) on the groups and prints the process's peak
resident memory (``ru_maxrss``, the figure ``/usr/bin/time -v`` reports) with the rows, padded
width and answer tokens of the batch. Neuron locating is replaced by all-neuron masks (ΔV is
dense [groups, layers, d_ff] either way, so memory does not depend on the masks) to skip its time.
Anything after ``--`` goes to ``lafn fit`` unchanged.
"""
from __future__ import annotations

import argparse
import sys
import resource
import tempfile
import time
from pathlib import Path

from lafn_lightning.api.settings import LafnCLI, resolve_config
import torch



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="0:16")
    parser.add_argument("--languages", default="null")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dataset", default=None, help="MzsRE folder (default: the dev records shipped in the package)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "lafn_edit_memory"))
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.rest = argv[cut + 1:]
    torch.set_num_threads(args.threads)
    import lafn_lightning.callbacks.neuron_locator as locator

    def all_neurons(model, adapter, layers, tokenizer, corpora, **kwargs):
        mask = torch.ones(len(layers), adapter.d_ff, dtype=torch.bool)
        return [(mask, {lang: mask for lang in corpus}) for corpus in corpora]

    locator.locate_groups = all_neurons
    argv = ["-c", resolve_config("demo"), "--data.groups", args.groups, "--data.languages", args.languages,
            "--model.dtype", args.dtype, "--trainer.max_steps", str(args.steps), "--cache_dir", args.out,
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", args.out,
            *(["--data.dataset", args.dataset] if args.dataset else []), *[a for a in args.rest if a != "--"]]
    t = time.perf_counter()
    cli = LafnCLI(argv, run=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    b = cli.datamodule.batch
    print(f"[memory] groups={args.groups} languages={args.languages} dtype={args.dtype} "
          f"chunked_loss={cli.model.hparams.chunked_loss} rows={b['input_ids'].shape[0]} width={b['input_ids'].shape[1]} "
          f"answer_tokens={int(b['target_mask'].sum())} padded_share={1 - b['attention_mask'].float().mean():.3f} "
          f"peak_rss_gb={peak:.2f} (after loading {before:.2f}) seconds={time.perf_counter() - t:.0f} (shared machine)")


if __name__ == "__main__":
    main()
