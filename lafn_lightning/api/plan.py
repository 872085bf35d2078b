"""``lafn plan``: size a run before starting it, from the backbone's config alone (no weights).

    lafn plan -c demo --data.languages null --data.groups null --edit_batch_size 16
    lafn plan -c llama3.1-8b --model.backbone random-llama3.1-8b --data.languages null --data.groups null \
        --edit_batch_size 16 --trainer.devices 8 --device_gb 80 --peak_tflops 989 --mfu 0.4

For the selected groups, edit batch and devices it prints the predicted peak memory per device
(:mod:`lafn_lightning.editing.sizing`, with the rows per checkpointed forward that ``max_rows:
auto`` would choose), the FLOPs per group step, the expected steps per group (``--steps_per_group``,
else the mean of a cache made with the same settings, ``--prior_cache``, else ``trainer.max_steps``),
and the hours at ``--peak_tflops`` (default: this machine's matrix-multiply peak, measured in a
second) times ``--mfu``. The token counts come from the backbone's tokenizer (``--tokenizer`` for
a backbone without one here, e.g. the demo's Gemma tokenizer for a ``random-*`` backbone).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .settings import Settings

__all__ = ["plan", "backbone_config", "group_shape"]


def backbone_config(spec: str, tokenizer: str | None = None):
    """``(config, tokenizer)`` of a backbone spec without loading its weights (``demo`` is converted
    once if needed; ``random-<name>[+TOKENIZER]``: the paper architecture's config)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..backbone.loading import backbone_folder
    from ..backbone.tiny import FULL_SIZE, full_size_config, tiny_model, tiny_tokenizer

    tok = None
    if spec.startswith("tiny-"):
        config, tok = tiny_model(spec[len("tiny-"):]).config, tiny_tokenizer()
    elif spec.startswith("random-"):
        name, _, tok_dir = spec[len("random-"):].partition("+")
        if name not in FULL_SIZE:
            raise ValueError(f"model.backbone {spec!r}: random-<name> with name in {sorted(FULL_SIZE)}")
        config = full_size_config(name)
        tokenizer = tokenizer or tok_dir or None
        tok = None if tokenizer else tiny_tokenizer()
    else:
        path = backbone_folder(spec)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if tokenizer is None:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(Path(os.path.expanduser(tokenizer)), local_files_only=True)
    return config, tok


def group_shape(groups, tokenizer, num_prefixes: int, prefix_length: int, paraphrase_prompts: int = 0):
    """Token counts of one edit batch of ``groups`` (:class:`..editing.sizing.StepShape`), each
    sampled prefix stood in for by ``prefix_length`` words of the language, with the first
    ``paraphrase_prompts`` paraphrases of each question as further rows."""
    from ..editing.prompts import PREFIX_SEEDS, anchor_text, encode_edit_text
    from ..editing.sizing import StepShape

    rows, anchors = [], []
    for g in groups:
        for lang, e in g.edits.items():
            prefix = " ".join([PREFIX_SEEDS.get(lang, "The")] * prefix_length)
            enc = encode_edit_text(tokenizer, prefix if num_prefixes else "", e.prompt, e.target, e.subject, g.subjects)
            rows += [enc] * max(num_prefixes, 1)
            rows += [encode_edit_text(tokenizer, "", q, e.target, e.subject, g.subjects)
                     for q in e.paraphrases[:paraphrase_prompts]]
            anchors.append(len(encode_edit_text(tokenizer, "", anchor_text(lang, e.subject), None, e.subject,
                                                g.subjects).input_ids))
    width = max(len(r.input_ids) for r in rows)
    return StepShape(groups=len(groups), rows=len(rows), width=width,
                     run_width=max(len(r.input_ids) - r.subject_pos for r in rows),
                     answer_tokens=sum(len(r.target_positions) for r in rows), kl_rows=len(anchors),
                     kl_width=max(anchors))


def _devices(trainer: dict) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    if str(devices).isdigit():
        return max(int(devices), 1)
    return max(torch.cuda.device_count(), 1) if str(trainer.get("accelerator")) in ("gpu", "cuda", "auto") else 1


def _prior_steps(prior_cache: str) -> float:
    from ..cache import EditCache

    cache = EditCache.open(prior_cache)
    steps = [cache.info(g)["meta"].get("steps") for g in cache.group_ids]
    steps = [s for s in steps if isinstance(s, (int, float))]
    if not steps:
        raise ValueError(f"--prior_cache {prior_cache}: no group records its steps")
    return sum(steps) / len(steps)


def plan(settings: Settings, edit_batch_size: int = 16, steps_per_group: float | None = None,
         prior_cache: str | None = None, peak_tflops: float | None = None, mfu: float | None = None,
         device_gb: float | None = None, tokenizer: str | None = None, output: str | None = None) -> dict:
    """Size a run before starting it: predicted peak memory per device, FLOPs, steps and hours.

    Args:
        settings: the parsed config (``-c CONFIG``, ``--data.*``, ``--model.*``, ``--trainer.*``).
        edit_batch_size: groups per fit (K), as ``lafn edit-dataset --edit_batch_size``.
        steps_per_group: expected optimisation steps per group (default: ``--prior_cache``, else
            ``trainer.max_steps``, an upper bound).
        prior_cache: an edit cache made with the same settings: its groups' mean steps is the prior.
        peak_tflops: the device's matrix-multiply peak in the backbone dtype (default: measured here).
        mfu: the share of that peak a step achieves (default: 0.55 on a CPU, as measured here; 0.4 on a GPU).
        device_gb: memory per device (GPU: 90 % of it is planned for, as ``max_rows: auto`` does);
            default: ``model.memory_budget_gb``, else this machine's budget (free GPU memory or half the RAM).
        tokenizer: a tokenizer folder for the token counts (default: the backbone's own).
        output: also write the plan as JSON here.
    """
    from ..backbone.loading import resolve_dtype
    from ..editing.sizing import (DEFAULT_MFU, GPU_HEADROOM, Architecture, auto_max_rows, default_part_tokens, delta_v_copies,
                                  device_budget_gb, matmul_peak, meta_model, step_flops, step_memory, step_seconds)

    if edit_batch_size < 1 or (mfu is not None and not 0 < mfu <= 1):
        raise ValueError("edit_batch_size must be >= 1 and mfu in (0, 1]")
    hp, data, trainer = settings.model, settings.data, settings.trainer
    selection = settings.load_selection()
    groups = selection.groups
    devices = _devices(trainer)
    dtype = resolve_dtype(hp.get("dtype", "float32"))
    config, tok = backbone_config(str(hp["backbone"]), tokenizer)
    arch = Architecture.of(meta_model(config, dtype), dtype)
    layers = [int(i) for i in hp["layers"]]
    first = min(layers)
    device = "cuda" if str(trainer.get("accelerator")) in ("gpu", "cuda") else "cpu"
    here = device if device == "cpu" or torch.cuda.is_available() else "cpu"   # planning a GPU run on a CPU
    if device_gb:   # a device's memory: on a GPU, what max_rows auto would plan for
        budget = device_gb * (GPU_HEADROOM if device == "cuda" else 1.0)
    else:
        budget = float(hp.get("memory_budget_gb") or device_budget_gb(torch.device(here)))
    part_tokens = hp.get("part_tokens") or default_part_tokens(device)
    kwargs = dict(device=device, cache_lower_layers=bool(hp.get("cache_lower_layers", True)) and first > 0,
                  prefix_cache=bool(hp.get("prefix_cache", True)), edited_layers=len(layers),
                  delta_v_copies=delta_v_copies(hp))

    # the edit batches as edit-dataset makes them, each sharded over the devices
    batches = [groups[i:i + edit_batch_size] for i in range(0, len(groups), edit_batch_size)]
    measured = peak_tflops is None
    if measured:
        peak_tflops = matmul_peak(dtype, device=here) / 1e12
    mfu = mfu or DEFAULT_MFU[device]
    worst, flops_per_group_step, seconds_per_group_step = None, [], []
    for batch in batches:
        for d in range(devices):
            mine = batch[d::devices]
            if not mine:
                continue
            shape = group_shape(mine, tok, int(data.get("num_prefixes", 4)), int(data.get("prefix_length", 5)),
                                int(data.get("paraphrase_prompts", 0)))
            max_rows = hp.get("max_rows", "auto")
            rows = auto_max_rows(arch, shape, first, budget * 1e9, part_tokens=part_tokens,
                                 **kwargs) if max_rows == "auto" else max_rows
            mem = step_memory(arch, shape, first, max_rows=rows, **kwargs)
            if worst is None or mem.peak > worst[1].peak:
                worst = (shape, mem)
            flop_kwargs = dict(max_rows=rows, cache_lower_layers=kwargs["cache_lower_layers"],
                               prefix_cache=kwargs["prefix_cache"])
            flops_per_group_step.append(step_flops(arch, shape, first, **flop_kwargs) / len(mine))
            seconds_per_group_step.append(step_seconds(arch, shape, first, peak_tflops * 1e12 * mfu, device=device,
                                                       **flop_kwargs) / len(mine))
    flops = sum(flops_per_group_step) / len(flops_per_group_step)
    per_group_step = sum(seconds_per_group_step) / len(seconds_per_group_step)
    if steps_per_group is None:
        steps_per_group = _prior_steps(prior_cache) if prior_cache else float(trainer.get("max_steps") or 1)
        steps_from = f"prior cache {prior_cache}" if prior_cache else "trainer.max_steps (an upper bound)"
    else:
        steps_from = "--steps_per_group"
    seconds_per_group = steps_per_group * per_group_step
    hours = len(groups) * seconds_per_group / devices / 3600
    shape, mem = worst
    result = {
        "backbone": str(hp["backbone"]), "dtype": str(dtype).replace("torch.", ""), "layers": layers,
        "languages": list(groups[0].languages), "groups": len(groups), "skipped": len(selection.skipped),
        "edit_batch_size": edit_batch_size, "devices": devices, "device": device,
        "memory_budget_gb": budget, "max_rows": mem.max_rows, "rows_per_device": shape.rows,
        "peak_memory_gb": mem.peak / 1e9, "memory_parts_gb": mem.gb(),
        "fits": mem.peak <= budget * 1e9,
        "gflop_per_group_step": flops / 1e9, "steps_per_group": steps_per_group,
        "steps_from": steps_from, "peak_tflops": peak_tflops, "peak_measured_here": measured, "mfu": mfu,
        "seconds_per_group_step": per_group_step,
        "seconds_per_group": seconds_per_group, "hours": hours,
    }
    _print(result)
    if output:
        from ..files import atomic_write

        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(output), json.dumps(result, indent=2) + "\n")
    return result


def _print(r: dict) -> None:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in r["memory_parts_gb"].items() if v >= 0.005)
    rows = "every row in one forward" if r["max_rows"] is None else f"{r['max_rows']} rows per checkpointed forward"
    lines = [
        f"plan: {r['groups']} group(s) ({r['skipped']} skipped) x {len(r['languages'])} language(s), edit batch "
        f"{r['edit_batch_size']} on {r['devices']} {r['device']} device(s); {r['backbone']} in {r['dtype']}, layers {r['layers']}",
        f"  memory per device: {r['peak_memory_gb']:.1f} GB predicted peak ({rows}; {r['rows_per_device']} answer rows) "
        f"of {r['memory_budget_gb']:.1f} GB{'' if r['fits'] else '  -- DOES NOT FIT: lower --edit_batch_size or model.part_tokens'}",
        f"    ({parts})",
        f"  compute: {r['gflop_per_group_step']:.1f} GFLOP per group step x {r['steps_per_group']:.1f} steps per group "
        f"({r['steps_from']})",
        f"  time: {r['seconds_per_group_step']:.2f} s per group step, {r['seconds_per_group']:.0f} s per group, "
        f"{r['hours']:.2f} h for the run at {r['mfu']:.0%} of {r['peak_tflops']:.3g} TFLOP/s "
        f"({'measured here' if r['peak_measured_here'] else '--peak_tflops'})",
    ]
    print("\n".join(lines), file=sys.stdout, flush=True)
