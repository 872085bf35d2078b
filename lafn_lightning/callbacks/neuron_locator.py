"""Locate each group's language-agnostic factual neurons before the fit starts."""
from __future__ import annotations

import zlib

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lafn_lightning.editing.locate import STRATEGIES, locate_groups


class NeuronLocator(L.Callback):
    """Fill the edit module's neuron mask (paper Eq. 4-6) from the data module's locating corpus.

    Args:
        beta: relative activation-count threshold (paper: 0.1 Llama-3.1-8B, 0 Qwen2-7B, 0.2 bloomz-7b1-mt).
        strategy: ``lafn`` (intersection over languages), ``all`` (every neuron of the edited
            layers) or ``random`` (as many neurons per layer as ``lafn`` finds, chosen at random).
        seed: seed of the ``random`` strategy (combined with each group id).
    """

    def __init__(self, beta: float = 0.1, strategy: str = "lafn", seed: int = 0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"locate.strategy={strategy!r}: one of {STRATEGIES}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"locate.beta={beta}: must be in [0, 1)")
        self.beta, self.strategy, self.seed = beta, strategy, seed
        self.per_language_counts: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if bool(pl_module.located):  # restored from a checkpoint
            return
        dm = trainer.datamodule
        model = pl_module.backbone.to(pl_module.device)
        layers = pl_module.layers
        lang_totals = {lang: torch.zeros(len(layers)) for lang in dm.languages}
        groups = [dm.groups[k] for k in dm.mine]  # this process's shard of the edit batch
        rank_zero_info(f"[lafn] locating neurons of {len(groups)} group(s)")
        located = locate_groups(model, pl_module.adapter, layers, pl_module.tokenizer,
                                [dm.locating_corpus(g) for g in groups], beta=self.beta, strategy=self.strategy,
                                seeds=[self.seed + zlib.crc32(g.group_id.encode()) for g in groups])
        for k, group, (mask, per_lang) in zip(dm.mine, groups, located):
            if not mask.any():
                rank_zero_info(f"[lafn] {group.group_id}: no language-agnostic neuron at beta={self.beta} in layers {layers}; "
                               "the group cannot be edited (try a lower locate.beta)")
            pl_module.mask[k] = mask.to(pl_module.mask.device)
            for lang, m in per_lang.items():
                lang_totals[lang] += m.sum(-1).float()
        pl_module.located.fill_(True)
        counts = pl_module.mask[dm.mine].sum(-1).float().mean(0)  # mean located neurons per layer
        metrics = {f"locate/neurons/layer{layer}": float(c) for layer, c in zip(layers, counts)}
        for lang, tot in lang_totals.items():
            metrics.update({f"locate/neurons_{lang}/layer{layer}": float(c) / len(groups) for layer, c in zip(layers, tot)})
        self.per_language_counts = {lang: tot / len(groups) for lang, tot in lang_totals.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        per_layer = ", ".join(f"L{layer}: {c:.0f}" for layer, c in zip(layers, counts))
        rank_zero_info(f"[lafn] located neurons per group (mean over {len(groups)} groups, strategy={self.strategy}, "
                       f"beta={self.beta}): {per_layer} of d_ff={pl_module.adapter.d_ff}")
