"""Locating language-agnostic factual neurons (paper Eq. 4-6).

For each language l, run the frozen model over the group's locating corpus C_l and count, for
every FFN neuron j of each edited layer i, the token positions where the activation is positive:
n_j = #{t : act_fn(h_t W_gate)_j > 0}. Keep D_l^i = {j : n_j / max_j n_j > beta} and intersect
over languages: D_G^i = ∩_l D_l^i.
"""
from __future__ import annotations

import inspect

import torch

from ..backbone.ffn import FFNAdapter
from ..backbone.hooks import Hooks

STRATEGIES = ("lafn", "all", "random")


@torch.no_grad()
def count_activations(model, adapter: FFNAdapter, layers, tokenizer, texts: list[str], *, batch_size: int = 16) -> torch.Tensor:
    """Per edited layer and neuron, the number of (non-padding, non-special) token positions with a positive activation."""
    counts = torch.zeros(len(layers), adapter.d_ff, dtype=torch.long)
    device = next(model.parameters()).device
    # Only FFN activations are needed: skip the vocabulary projection of every position (with a
    # 262k vocabulary it costs more than the layers themselves on short texts).
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        return_special_tokens_mask=True)
        keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).to(device)
        seen: dict[int, torch.Tensor] = {}

        def make(j):
            def record(out):
                seen[j] = ((out > 0) & keep.unsqueeze(-1)).sum(dim=(0, 1)).cpu()
            return record

        with Hooks() as hooks:
            for j, layer in enumerate(layers):
                hooks.on_output(adapter.activation_module(model, layer), make(j))
            model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), **extra)
        for j in range(len(layers)):
            counts[j] += seen[j]
    return counts


def language_neurons(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """D_l: neurons whose count, relative to the layer's largest count, exceeds ``beta`` (Eq. 5)."""
    top = counts.max(dim=-1, keepdim=True).values.clamp(min=1)
    return (counts.float() / top.float()) > beta


def agnostic_neurons(per_language: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """D_G: the intersection over languages of D_l (Eq. 6), as a bool mask [layers, d_ff]."""
    masks = [language_neurons(c, beta) for c in per_language.values()]
    out = masks[0].clone()
    for m in masks[1:]:
        out &= m
    return out


def random_like(mask: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Same number of neurons per layer as ``mask``, chosen uniformly at random (paper Table 6)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask)
    for j in range(mask.shape[0]):
        k = int(mask[j].sum())
        out[j, torch.randperm(mask.shape[1], generator=gen)[:k]] = True
    return out


def locate_group(model, adapter, layers, tokenizer, corpus: dict[str, list[str]], *, beta: float,
                 strategy: str = "lafn", seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The neuron mask of one edit group and the per-language sets it came from."""
    if strategy not in STRATEGIES:
        raise ValueError(f"locate.strategy={strategy!r}: one of {STRATEGIES}")
    per_lang_counts = {lang: count_activations(model, adapter, layers, tokenizer, texts) for lang, texts in corpus.items()}
    per_lang = {lang: language_neurons(c, beta) for lang, c in per_lang_counts.items()}
    mask = agnostic_neurons(per_lang_counts, beta)
    if strategy == "all":
        mask = torch.ones_like(mask)
    elif strategy == "random":
        mask = random_like(mask, seed=seed)
    return mask, per_lang
