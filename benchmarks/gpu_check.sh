#!/usr/bin/env bash
# The one device check for a run that has a GPU (docs/results.md, "Speed, memory, inference"):
# the project's loop on an edit batch of 16 groups x 12 languages x 4 prompts, on a random-weight
# Llama-3.1-8B (lafn_lightning.backbone.tiny.FULL_SIZE) in bf16: seconds per group step, peak GPU
# memory, the share of the bf16 matmul peak, and the compute bound.
#
# Prepare here (the device machine has no network and none of this project's files beyond the tree):
#   mkdir -p runs/gpu_carry/tokenizer runs/gpu_carry/wheels
#   cp ~/.cache/lafn_lightning/gemma-3-270m/tokenizer*.json runs/gpu_carry/tokenizer/   # after `lafn fit -c demo` once
#   pip download --no-deps -d runs/gpu_carry/wheels jsonargparse docstring-parser typeshed-client torchmetrics
# then call the device tool's run with command "bash benchmarks/gpu_check.sh", carry ["runs/gpu_carry"],
# timeout_s 540. What it prints also lands in $OUT/gpu_check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
missing=$(python - <<'PY'
import importlib.util
need = ["torch", "lightning", "transformers", "jsonargparse", "docstring_parser", "typeshed_client",
        "safetensors", "torchmetrics", "tokenizers"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "[gpu check] installing from runs/gpu_carry/wheels: $missing"
    pip install -q --no-index --no-deps --find-links runs/gpu_carry/wheels runs/gpu_carry/wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
out=${OUT:-/tmp}/gpu_check.txt
python benchmarks/step_time.py --config llama3.1-8b --groups 0:16 --dtype bfloat16 --steps 4 --threads 16 \
    --flops --group-steps 63.6 -- --model.backbone "random-llama3.1-8b+runs/gpu_carry/tokenizer" \
    --trainer.accelerator gpu 2>&1 | grep --line-buffered "step time\|Error\|error" | tee "$out"
