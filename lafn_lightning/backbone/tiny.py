"""Tiny random causal LMs of every supported FFN family, with a byte-level tokenizer built in code.

    model, tokenizer = tiny_model("gemma3"), tiny_tokenizer()   # or load_backbone("tiny-gemma3")

For tests and for checking a config in seconds; nothing is downloaded.
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
