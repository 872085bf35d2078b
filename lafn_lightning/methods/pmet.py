"""M-PMET: MEMIT with the residual split into attention and FFN parts (Li et al., AAAI 2024).

Usage::

    update = pmet_edit(model, tok, requests_by_language(groups), PmetHParams(layers=[4, 5, 6, 7, 8]))

Per request, two deltas at the last edit layer are optimised jointly: one on the attention
block's output and one on the FFN (down_proj) output (EasyEdit ``pmet/compute_zs.py``). Only the
FFN target is written into the weights (PMET updates FFNs only; the attention delta is
discarded): for each layer, R = (z_ffn - current FFN output at the last layer) / sqrt(layers
left), delta W = R K^T (K K^T + lambda C_l)^{-1}. Per language, with that language's statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .compute_z import ValueHParams, optimise_values, prefix_groups
from .lowrank import LowRankUpdate
from .run import ArtifactEditing
from .memit import spread
from .stats import key_second_moments


@dataclass
class PmetHParams(ArtifactEditing):
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    #: EasyEdit hparams/PMET/llama-7b.yaml
    value: ValueHParams = field(default_factory=lambda: ValueHParams(v_num_grad_steps=20, v_weight_decay=0.5,
                                                                     clamp_norm_factor=1.0))
    prefixes: list = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 15000.0
    mom2_n_samples: int = 2000

    name = "pmet"

    def edit(self, model, tokenizer, requests: dict, **kwargs) -> LowRankUpdate:
        """``pmet_edit(model, tokenizer, requests, self, **kwargs)`` (the config's ``class_path`` entry point)."""
        return pmet_edit(model, tokenizer, requests, self, **kwargs)


def pmet_edit(model, tokenizer, requests: dict, hp: PmetHParams, *, stats_dir=None,
              update: LowRankUpdate | None = None, log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    z_layer = hp.layers[-1]
    n = len(hp.layers)
    for lang, reqs in requests.items():
        C = key_second_moments(model, tokenizer, hp.layers, lang, n_samples=hp.mom2_n_samples, stats_dir=stats_dir)
        prefixes = prefix_groups(model, tokenizer, lang, hp.prefixes)
        with update.applied(model):
            zs = []
            for req in reqs:
                z_attn, z_ffn = optimise_values(model, tokenizer, req, [("attn", z_layer), ("down", z_layer)],
                                                hp.value, prefixes)
                zs.append(z_ffn.target)
                log(f"pmet z {lang} {req.subject!r} -> {req.target!r}: nll {z_ffn.final_nll:.3f} "
                    f"|d_attn| {z_attn.delta.norm():.2f} |d_ffn| {z_ffn.delta.norm():.2f}")
        spread(model, tokenizer, reqs, hp, prefixes, C, torch.stack(zs), ("down", z_layer), update,
               scale=lambda i: math.sqrt(n - i), log=log)
    return update
