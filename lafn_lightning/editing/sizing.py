"""Memory and FLOPs of one optimisation step of an edit batch, from the backbone's architecture alone.

    shape = StepShape(groups=16, rows=768, width=48, run_width=30, answer_tokens=2928, kl_rows=192, kl_width=9)
    arch = Architecture.of(meta_model)                 # a model built on the meta device (no weights)
    est = step_memory(arch, shape, first_layer=5, max_rows=64)
    est.peak, est.parts                                # bytes; the parts of the peak, by name
    auto_max_rows(arch, shape, first_layer=5, budget=8e9)    # None: every row in one forward fits

The memory of a step is (1) the process's base (CPU: the Python runtime with torch, transformers
and Lightning imported) and the weights, (2) what lives for the whole fit: ΔV with Adam's state,
the lower layers' states and the prefix cache's keys and values (only the layers that run), the
KL reference, and (3) what one forward/backward holds: the activations saved for the backward of
the rows that run in one graph (all answer rows, or ``max_rows`` of them when each part is
checkpointed), the loss's logits chunk and the KL anchors' forward. Saved activations are counted
by running the backbone's forward on the meta device under ``saved_tensors_hooks``, so every
family (attention implementation, norms, gating) is counted as it runs. The constants below were
fitted on measured peaks (docs/results.md "Sizing a run"); ``lafn plan`` prints this estimate.

FLOPs count the matrix products: the layers from the first edited one up run forward, backward
(input gradients only: the weights are frozen) and, when checkpointed, forward again; the LM head
runs at the answer positions and the anchors' last positions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["Architecture", "StepShape", "MemoryEstimate", "step_memory", "step_flops", "auto_max_rows",
           "meta_model", "matmul_peak", "step_seconds", "PROCESS_BASE_BYTES", "BACKWARD_FACTOR",
           "DEFAULT_MFU", "PART_OVERHEAD_S", "GPU_HEADROOM",
           "CPU_PART_TOKENS", "default_part_tokens", "batch_shape", "device_budget_gb"]

#: Resident memory of a CPU process that has imported torch, transformers and Lightning and runs
#: a fit (allocator, libraries, tokenizer, data), on top of what the tensors take. GPU: not counted
#: (the device's allocated memory is what is predicted there).
PROCESS_BASE_BYTES = {"cpu": 1.0e9, "cuda": 0.0}
#: Peak of one forward/backward relative to the saved activations the meta probe counts (which
#: overcounts tensors that share storage on a real device, and misses the backward's temporaries).
BACKWARD_FACTOR = 0.87
#: Share of the matrix-multiply peak an edit step achieves, per device type, for ``lafn plan``'s
#: time: fitted on the 2-core CPU (demo backbone, fp32 and bf16: 50-64 % of the measured peak); on
#: a GPU an assumption (the paper-scale table's 40 %) until a measured figure replaces it.
DEFAULT_MFU = {"cpu": 0.55, "cuda": 0.4}
#: Seconds of fixed cost per forward/backward of one part (Python, hooks, dispatch), per device
#: type: fitted on the tiny backbone on the CPU (it dominates there); not measured on a GPU.
PART_OVERHEAD_S = {"cpu": 0.015, "cuda": 0.0}
#: Share of a GPU's memory that ``max_rows: auto`` and ``lafn plan`` plan for: the rest is left to
#: the CUDA context, allocator fragmentation and what the prediction misses (not measured here).
GPU_HEADROOM = 0.9
#: Rows of the loss's logits chunk (:mod:`.chunked_loss`).
LOSS_CHUNK_ROWS = 256


@dataclass(frozen=True)
class Architecture:
    """The sizes of a backbone that a step's memory and FLOPs depend on."""

    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    kv_width: int            # key (= value) features per token and layer: kv heads x head dim
    q_width: int             # query features: heads x head dim
    layer_matmul_params: int  # weights of one decoder layer's matrix products
    weight_bytes: int         # all parameters in the backbone dtype (tied weights once)
    dtype_bytes: int
    saved_per_token: float    # activation bytes saved for backward per token and decoder layer
    saved_per_token2: float   # ... per (query x key) pair and layer (attention weights, if kept)

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype | None = None) -> "Architecture":
        """Read the sizes of a (meta or real) Hugging Face causal LM; count its saved activations on
        the meta device."""
        from ..backbone.ffn import adapter_for

        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        adapter = adapter_for(model)
        dtype = dtype or next(model.parameters()).dtype
        b = torch.finfo(dtype).bits // 8
        heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        d = int(cfg.hidden_size)
        head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        layer = adapter.layer_module(model, 0)
        matmul = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
        weights = sum(p.numel() for p in model.parameters()) * b
        per_token, per_pair = _saved_activation_bytes(type(model), model.config, dtype)
        return cls(adapter.n_layers, d, adapter.d_ff, int(cfg.vocab_size), kv_heads * head_dim, heads * head_dim,
                   int(matmul), int(weights), b, per_token, per_pair)


def meta_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM of ``config`` on the meta device: shapes only, no memory, built in a second."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@lru_cache(maxsize=8)
def _probe(model_cls, cfg_cls, cfg_json: str, dtype: torch.dtype, rows: int, width: int) -> float:
    """Bytes saved for backward by one forward of ``rows x width`` tokens through every decoder
    layer, on the meta device (parameters and buffers excluded; each tensor counted once)."""
    import json

    cfg = cfg_cls.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = model_cls(cfg).to(dtype)
    model.requires_grad_(False)
    frozen = {id(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in frozen and id(t) not in frozen:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    emb = torch.zeros(rows, width, model.get_input_embeddings().embedding_dim, device="meta", dtype=dtype,
                      requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=emb, logits_to_keep=1)
    return float(sum(saved.values()))


def _saved_activation_bytes(model_cls, cfg, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes per token and layer, bytes per query-key pair and layer) saved for backward, from
    two meta probes of different widths (the part that grows with width squared is attention's)."""
    import json

    cfg_json = json.dumps(cfg.to_dict(), default=str)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
    rows = 2
    w1, w2 = 16, 32
    a, b = (_probe(model_cls, type(cfg), cfg_json, dtype, rows, w) for w in (w1, w2))
    # a = rows * (t * w1 + p * w1^2) * n, b = rows * (t * w2 + p * w2^2) * n
    p = max(0.0, (b / w2 - a / w1) / (w2 - w1) / rows / n)
    t = max(0.0, a / (rows * w1 * n) - p * w1)
    return t, p


@dataclass(frozen=True)
class StepShape:
    """Token counts of one optimisation step with every group of the edit batch active."""

    groups: int
    rows: int                # answer rows: groups x languages x prompts
    width: int               # padded width of the answer rows
    run_width: int           # positions that run at each step (after the prefix cache's cut)
    answer_tokens: int       # answer tokens over all rows (LM-head positions)
    kl_rows: int             # KL anchors: groups x languages
    kl_width: int


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of a step and its parts (:func:`step_memory`)."""

    peak: float
    parts: dict[str, float] = field(default_factory=dict)
    max_rows: int | None = None

    def gb(self) -> dict[str, float]:
        return {k: round(v / 1e9, 2) for k, v in self.parts.items()}


def _activations(arch: Architecture, rows: int, q: int, kv: int, layers: int) -> float:
    return rows * layers * (arch.saved_per_token * q + arch.saved_per_token2 * q * kv)


def delta_v_copies(model: Mapping[str, Any]) -> float:
    """ΔV-sized fp32 tensors a fit with these ``model`` settings keeps: ΔV, its gradient and the
    frozen copy, plus Adam's m and v, or L-BFGS's (s, y) pairs and its four per-group points and gradients.

    >>> delta_v_copies({"optimizer": "lbfgs", "lbfgs_history": 3})
    13.0
    """
    if model.get("optimizer", "adam") == "lbfgs":
        return 3.0 + 2.0 * model.get("lbfgs_history", 10) + 4.0
    return 5.0


def step_memory(arch: Architecture, shape: StepShape, first_layer: int, *, max_rows: int | None = None,
                device: str = "cpu", cache_lower_layers: bool = True, prefix_cache: bool = True,
                edited_layers: int = 4, delta_v_copies: float = 5.0) -> MemoryEstimate:
    """Predicted peak memory of one step (see the module docstring for what is counted);
    ``delta_v_copies``: ΔV-sized fp32 tensors the fit keeps (:func:`delta_v_copies`)."""
    b = arch.dtype_bytes
    upper = arch.n_layers - (first_layer if cache_lower_layers else 0)
    kv_width = shape.width if prefix_cache else shape.run_width
    q = shape.run_width if prefix_cache else shape.width
    parts = {
        "base": PROCESS_BASE_BYTES.get(device, 0.0),
        "weights": float(arch.weight_bytes),
        "delta_v": delta_v_copies * shape.groups * edited_layers * arch.d_ff * 4,
        "kl_reference": 4.0 * shape.kl_rows * arch.vocab,
    }
    if cache_lower_layers and first_layer > 0:
        parts["lower_states"] = float(b * arch.d_model * (shape.rows * shape.width + shape.kl_rows * shape.kl_width))
    if prefix_cache:
        parts["prefix_cache"] = float(2 * b * arch.kv_width * shape.rows * shape.width * upper)
    rows = shape.rows if max_rows is None else min(max_rows, shape.rows)
    parts["activations"] = BACKWARD_FACTOR * _activations(arch, rows, q, kv_width, upper)
    chunk = min(LOSS_CHUNK_ROWS, shape.answer_tokens)
    parts["loss_chunk"] = 2.0 * 4 * chunk * arch.vocab                        # logits chunk and its gradient
    parts["kl_forward"] = (BACKWARD_FACTOR * _activations(arch, shape.kl_rows, shape.kl_width, shape.kl_width, upper)
                           + 3.0 * 4 * shape.kl_rows * arch.vocab)             # log-softmax, KL terms, gradient
    return MemoryEstimate(sum(parts.values()), parts, max_rows)


def auto_max_rows(arch: Architecture, shape: StepShape, first_layer: int, budget: float, *,
                  part_tokens: int | None = None, **kwargs) -> int | None:
    """The ``max_rows`` for a memory ``budget`` in bytes: None (every row in one graph, no
    recompute) when that fits :func:`step_memory` and the rows hold at most ``part_tokens``
    running tokens; else the largest part that fits, of at most ``part_tokens`` tokens. At least
    one row."""
    def fits(rows):
        return step_memory(arch, shape, first_layer, max_rows=rows, **kwargs).peak <= budget

    cap = max(1, part_tokens // max(shape.run_width, 1)) if part_tokens else shape.rows
    if cap >= shape.rows and fits(None):
        return None
    lo, hi = 1, min(shape.rows, cap)
    if not fits(lo):
        return 1
    while lo < hi:   # the largest part that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


#: ``model.part_tokens: null`` on a CPU: at most this many running tokens per forward. On the demo
#: backbone (2 cores, AVX512-BF16) one graph of up to about 6,000 tokens is faster than checkpointed
#: parts of 2,048 (each part's forward and LM head run again in the backward), and 16 groups x 12
#: languages in bf16 (15,400 tokens) take 38 s per step in parts of 8,192 tokens against 48 s in
#: parts of 2,048 (docs/scale.md).
CPU_PART_TOKENS = 8192


def default_part_tokens(device_type: str) -> int | None:
    """``model.part_tokens: null``: :data:`CPU_PART_TOKENS` on a CPU, no limit on a GPU."""
    return CPU_PART_TOKENS if device_type == "cpu" else None


def batch_shape(batch: dict) -> StepShape:
    """The token counts of an encoded edit batch (:class:`StepShape`): rows, padded width,
    the positions that run (from the earliest subject position), answer tokens, KL anchors."""
    att, kl_att = batch["attention_mask"], batch["kl_attention_mask"]
    width = int(att.sum(1).max())
    run = int((att.shape[1] - batch["subject_pos"]).max())
    groups = int(batch["group"].max()) + 1 if len(batch["group"]) else 0
    return StepShape(groups=groups, rows=att.shape[0], width=width, run_width=min(run, width),
                     answer_tokens=int(batch["target_mask"].sum()), kl_rows=kl_att.shape[0],
                     kl_width=int(kl_att.sum(1).max()))


def device_budget_gb(device: torch.device) -> float:
    """The default memory budget: :data:`GPU_HEADROOM` of the free plus this process's memory
    on a GPU, half the RAM on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return GPU_HEADROOM * (free + torch.cuda.memory_allocated(device)) / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2e9


def step_flops(arch: Architecture, shape: StepShape, first_layer: int, *, max_rows: int | None = None,
               cache_lower_layers: bool = True, prefix_cache: bool = True) -> float:
    """Matrix-product FLOPs of one optimisation step of the whole edit batch (all groups active)."""
    upper = arch.n_layers - (first_layer if cache_lower_layers else 0)
    q = shape.run_width if prefix_cache else shape.width

    def layers(rows: int, q_len: int, kv_len: int) -> float:
        linear = 2.0 * arch.layer_matmul_params * rows * q_len
        attention = 2.0 * 2 * arch.q_width * rows * q_len * kv_len
        return upper * (linear + attention)

    answer = layers(shape.rows, q, shape.width)
    kl = layers(shape.kl_rows, shape.kl_width, shape.kl_width)
    head = 2.0 * arch.d_model * arch.vocab * (shape.answer_tokens + shape.kl_rows)
    recompute = answer if max_rows is not None and max_rows < shape.rows else 0.0
    return 2 * (answer + kl + head) + recompute    # forward + input-gradient backward (+ checkpoint recompute)


def step_seconds(arch: Architecture, shape: StepShape, first_layer: int, flop_rate: float, *, device: str = "cpu",
                 max_rows: int | None = None, **kwargs) -> float:
    """Predicted seconds of one step: :func:`step_flops` at ``flop_rate`` FLOP/s (peak x MFU),
    plus :data:`PART_OVERHEAD_S` per forward (each checkpointed part, and the KL anchors')."""
    parts = 1 if max_rows is None else -(-shape.rows // max(1, min(max_rows, shape.rows)))
    flops = step_flops(arch, shape, first_layer, max_rows=max_rows, **kwargs)
    return flops / flop_rate + (parts + 1) * PART_OVERHEAD_S.get(device, 0.0)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best FLOP/s of an n x n matrix multiply in ``dtype`` on this process's threads (or on
    ``device``: a GPU wants a larger ``n``, e.g. 8192)."""
    import time

    if str(device).startswith("cuda") and n < 8192:
        n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
