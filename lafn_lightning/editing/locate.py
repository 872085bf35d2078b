"""Locating language-agnostic factual neurons (paper Eq. 4-6).

For each language l, run the frozen model over the group's locating corpus C_l and count, for
every FFN neuron j of each edited layer i, the token positions where the activation is positive:
n_j = #{t : act_fn(h_t W_gate)_j > 0}. Keep D_l^i = {j : n_j / max_j n_j > beta} and intersect
over languages: D_G^i = ∩_l D_l^i.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..backbone.ffn import FFNAdapter
from ..backbone.hooks import Hooks, forward_until_stop

STRATEGIES = ("lafn", "all", "random")


@torch.no_grad()
def count_activations(model, adapter: FFNAdapter, layers, tokenizer, texts: list[str], *, batch_size: int = 16) -> torch.Tensor:
    """Per edited layer and neuron, the number of (non-padding, non-special) token positions with a positive activation."""
    return count_activations_of_sets(model, adapter, layers, tokenizer, [texts], batch_size=batch_size)[0]


@torch.no_grad()
def count_activations_of_sets(model, adapter: FFNAdapter, layers, tokenizer, text_sets: Sequence[Sequence[str]], *,
                              batch_size: int = 16) -> list[torch.Tensor]:
    """:func:`count_activations` of each set of texts (e.g. every group and language of an edit
    batch), in shared forwards: the texts of all sets, ordered by length, ``batch_size`` at a time;
    each forward stops after the last edited layer (the layers above and the LM head never run).

        counts = count_activations_of_sets(model, adapter, [5, 6], tok, [["Q1", "P1"], ["Q2"]])   # 2 x [2, d_ff]
    """
    layers = list(layers)
    counts = torch.zeros(len(text_sets), len(layers), adapter.d_ff, dtype=torch.long)
    flat = [(k, t) for k, texts in enumerate(text_sets) for t in texts]
    if not flat:
        return list(counts)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer([t for _, t in flat])["input_ids"]]
    order = sorted(range(len(flat)), key=lambda i: lengths[i])
    top = adapter.activation_module(model, max(layers))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = tokenizer([flat[i][1] for i in rows], return_tensors="pt", padding=True, return_special_tokens_mask=True)
        keep = (enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()).to(device)
        seen: dict[int, torch.Tensor] = {}

        def make(j):
            def record(out):
                seen[j] = ((out > 0) & keep.unsqueeze(-1)).sum(dim=1).cpu()   # [rows, d_ff]
            return record

        with Hooks() as hooks:
            for j, layer in enumerate(layers):
                hooks.on_output(adapter.activation_module(model, layer), make(j))
            hooks.stop_after(top)
            forward_until_stop(model, input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        owners = torch.tensor([flat[i][0] for i in rows])
        counts.index_add_(0, owners, torch.stack([seen[j] for j in range(len(layers))], 1))
    return list(counts)


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
    return locate_groups(model, adapter, layers, tokenizer, [corpus], beta=beta, strategy=strategy, seeds=[seed])[0]


def locate_groups(model, adapter, layers, tokenizer, corpora: Sequence[dict[str, list[str]]], *, beta: float,
                  strategy: str = "lafn", seeds: Sequence[int] | None = None, batch_size: int = 16
                  ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """:func:`locate_group` of each group's locating corpus (``{language: texts}``), counted in
    shared forwards (:func:`count_activations_of_sets`); ``seeds``: one per group (``random``).

        [(mask, per_language)] = locate_groups(model, adapter, [5, 6], tok, [{"en": [...], "zh": [...]}], beta=0.1)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"locate.strategy={strategy!r}: one of {STRATEGIES}")
    seeds = list(seeds) if seeds is not None else [0] * len(corpora)
    sets = [(g, lang) for g, corpus in enumerate(corpora) for lang in corpus]
    counts = count_activations_of_sets(model, adapter, layers, tokenizer, [corpora[g][lang] for g, lang in sets],
                                       batch_size=batch_size)
    per_group: list[dict[str, torch.Tensor]] = [{} for _ in corpora]
    for (g, lang), c in zip(sets, counts):
        per_group[g][lang] = c
    out = []
    for per_lang_counts, seed in zip(per_group, seeds):
        per_lang = {lang: language_neurons(c, beta) for lang, c in per_lang_counts.items()}
        mask = agnostic_neurons(per_lang_counts, beta)
        if strategy == "all":
            mask = torch.ones_like(mask)
        elif strategy == "random":
            mask = random_like(mask, seed=seed)
        out.append((mask, per_lang))
    return out
