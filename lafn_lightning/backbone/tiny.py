"""Tiny random causal LMs of every supported FFN family, with a byte-level tokenizer built in code.

    model, tokenizer = tiny_model("gemma3"), tiny_tokenizer()   # or load_backbone("tiny-gemma3")
    model = full_size_model("llama3.1-8b")                      # or load_backbone("random-llama3.1-8b")

For tests and for checking a config in seconds; nothing is downloaded. :func:`full_size_model`
builds a paper backbone's architecture with random weights, for speed and memory checks on a
machine that holds no checkpoint (weights do not change either).
"""
from __future__ import annotations

import torch

TINY_FAMILIES = ("llama", "qwen2", "gemma3", "bloom", "gpt2")


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


#: The published architectures of the paper's 7-8B backbones (their Hugging Face configs' sizes;
#: the rotary settings, which change no FLOP count, are the library's defaults).
FULL_SIZE = {
    "llama3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                               max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "bloomz-7b1-mt": ("bloom", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880,
                                    tie_word_embeddings=True)),
}


def full_size_config(name: str, *, vocab_size: int | None = None):
    """The Hugging Face config of ``FULL_SIZE[name]`` (``vocab_size``: at least this many rows)."""
    import transformers as tf

    if name not in FULL_SIZE:
        raise ValueError(f"unknown full-size backbone {name!r}; one of {sorted(FULL_SIZE)}")
    family, sizes = FULL_SIZE[name]
    cfg_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "bloom": tf.BloomConfig}[family]
    sizes = dict(sizes, vocab_size=max(sizes["vocab_size"], vocab_size or 0))
    return cfg_cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes)


def full_size_model(name: str, *, vocab_size: int | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device | None = None, seed: int = 0):
    """A random-weight causal LM with the architecture of ``FULL_SIZE[name]``, built directly in
    ``dtype`` on ``device`` (default: the GPU if there is one), so 8B parameters never pass
    through fp32 host memory. ``vocab_size``: at least this many embedding rows (for a tokenizer
    with a larger vocabulary than the backbone's own)."""
    from transformers import AutoModelForCausalLM

    cfg = full_size_config(name, vocab_size=vocab_size)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(default)
    model.config.name_or_path = f"random-{name}"
    return model
