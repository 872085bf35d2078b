"""M-PMET: MEMIT with the residual split into attention and FFN parts (Li et al., AAAI 2024).

Usage::

    update = pmet_edit(model, tok, requests_by_language(groups), PmetMethod(layers=[4, 5, 6, 7, 8]))

Per request, two deltas at the last edit layer are optimised jointly: one on the attention
block's output and one on the FFN (down_proj) output (EasyEdit ``pmet/compute_zs.py``). Only the
FFN target is written into the weights (PMET updates FFNs only; the attention delta is
discarded): for each layer, R = (z_ffn - current FFN output at the last layer) / sqrt(layers
left), delta W = R K^T (K K^T + lambda C_l)^{-1}. Per language, with that language's statistics
(``joint_languages: true``: one solve with their mean). ``rewrite: [down, o_proj]`` also writes
the attention target into the attention output projection the same way (EasyEdit's
``rewrite_module_tmps`` with both modules).

Two options for backbones where PMET's FFN-only write falls short (Gemma-3: post-FFN norms, an
attention output 6-8x the FFN's at the last edit layer; docs/locate_then_edit.md "Design decisions"):
``attn_clamp_norm_factor`` bounds the attention delta (0: the FFN delta carries the whole edit),
and ``spread_rule: residual`` spreads the FFN target's change by MEMIT's self-correcting rule.
Where FFN outputs pass a post-FFN norm, R is converted between layers in residual-stream units
(:func:`~lafn_lightning.methods.memit.spread`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .compute_z import ValueHParams, optimise_values, prefix_groups, read_sites
from .lowrank import LowRankUpdate
from .base import deprecated_names
from .run import ArtifactEditing
from .memit import down_to_residual, mean_statistics, spread


@dataclass
class PmetMethod(ArtifactEditing):
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    #: EasyEdit hparams/PMET/llama-7b.yaml
    value: ValueHParams = field(default_factory=lambda: ValueHParams(v_num_grad_steps=20, v_weight_decay=0.5,
                                                                     clamp_norm_factor=1.0))
    prefixes: list = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 15000.0
    mom2_n_samples: int = 2000
    #: the matrices written (EasyEdit's ``rewrite_module_tmps``): ``[down]`` is PMET (FFN only; the
    #: attention target is discarded); ``[down, o_proj]`` also writes the attention target into the
    #: attention output projection, with its own key statistics
    rewrite: list = field(default_factory=lambda: ["down"])
    #: one least-squares solve for all languages' requests, with the mean of their statistics
    #: (false: the languages one after the other, each with its own; as M-MEMIT)
    joint_languages: bool = False
    #: the attention delta's norm clamp, relative to the attention output's norm (``None``: the
    #: value's ``clamp_norm_factor``, as PMET; 0: no attention delta, the FFN target carries the
    #: whole edit, as EasyEdit's single-site ``pmet/compute_zs.compute_z``)
    attn_clamp_norm_factor: float | None = None
    #: how the FFN target is spread over ``layers``: ``pmet`` (PMET: R = (z_ffn - current FFN
    #: output at the last layer) / sqrt(layers left)) or ``residual`` (the FFN target's change, in
    #: residual-stream units, made a target for the last layer's residual output and spread by
    #: MEMIT's rule, which re-reads what earlier layers already wrote; ``rewrite: [down]`` only)
    spread_rule: str = "pmet"

    name = "pmet"

    def __post_init__(self):
        bad = [m for m in self.rewrite if m not in ("down", "o_proj")]
        if bad or "down" not in self.rewrite:
            raise ValueError(f"method.init_args.rewrite: {list(self.rewrite)}; PMET writes [down] or [down, o_proj]")
        if self.spread_rule not in ("pmet", "residual") or (self.spread_rule == "residual" and len(self.rewrite) > 1):
            raise ValueError(f"method.init_args.spread_rule: {self.spread_rule!r}; pmet, or residual with "
                             "rewrite [down]")
        if self.attn_clamp_norm_factor is not None and self.attn_clamp_norm_factor < 0:
            raise ValueError(f"method.init_args.attn_clamp_norm_factor: {self.attn_clamp_norm_factor}; "
                             "a norm factor >= 0 (or null: the value's clamp_norm_factor)")

    @property
    def clamps(self) -> list[float]:
        """Norm-clamp factors of the (attention, FFN) deltas."""
        attn = self.value.clamp_norm_factor if self.attn_clamp_norm_factor is None else self.attn_clamp_norm_factor
        return [attn, self.value.clamp_norm_factor]

    def edit(self, model, tokenizer, requests: dict, **kwargs) -> LowRankUpdate:
        """``pmet_edit(model, tokenizer, requests, self, **kwargs)`` (the config's ``class_path`` entry point)."""
        return pmet_edit(model, tokenizer, requests, self, **kwargs)


def residual_targets(model, tokenizer, reqs, layer: int, z_ffn: torch.Tensor) -> torch.Tensor:
    """FFN-output targets ``z_ffn`` of ``reqs`` at ``layer`` as targets for that layer's residual
    output (``spread_rule: residual``): the current residual plus the change the new FFN output
    makes after the post-FFN norm (:func:`~lafn_lightning.methods.memit.down_to_residual`)."""
    h, y = read_sites(model, tokenizer, reqs, [("residual", layer, "out"), ("down", layer, "out")])
    return h + down_to_residual(model, layer, z_ffn) - down_to_residual(model, layer, y)


def pmet_edit(model, tokenizer, requests: dict, hp: PmetMethod, *, stats_dir=None,
              update: LowRankUpdate | None = None, log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    z_layer = hp.layers[-1]
    n = len(hp.layers)
    sites = {"o_proj": ("attn", z_layer), "down": ("down", z_layer)}
    batches = [requests] if hp.joint_languages else [{lang: reqs} for lang, reqs in requests.items()]
    for batch in batches:
        C = {m: mean_statistics(model, tokenizer, hp, list(batch), stats_dir=stats_dir, module=m) for m in hp.rewrite}
        prefixes = {lang: prefix_groups(model, tokenizer, lang, hp.prefixes) for lang in batch}
        reqs = [req for rs in batch.values() for req in rs]
        zs = {"o_proj": [], "down": []}
        with update.applied(model):
            for req in reqs:
                z_attn, z_ffn = optimise_values(model, tokenizer, req, [sites["o_proj"], sites["down"]],
                                                hp.value, prefixes[req.language], clamp=hp.clamps)
                zs["o_proj"].append(z_attn.target)
                zs["down"].append(z_ffn.target)
                log(f"pmet z {req.language} {req.subject!r} -> {req.target!r}: nll {z_ffn.final_nll:.3f} "
                    f"|d_attn| {z_attn.delta.norm():.2f} |d_ffn| {z_ffn.delta.norm():.2f}")
            if hp.spread_rule == "residual":
                z_res = residual_targets(model, tokenizer, reqs, z_layer, torch.stack(zs["down"]))
        if hp.spread_rule == "residual":
            spread(model, tokenizer, reqs, hp, prefixes, [("down", ("residual", z_layer), C["down"], z_res)], update,
                   scale=lambda i: float(n - i), log=log)
            continue
        writes = [(m, sites[m], C[m], torch.stack(zs[m])) for m in hp.rewrite]
        spread(model, tokenizer, reqs, hp, prefixes, writes, update, scale=lambda i: math.sqrt(n - i), log=log)
    return update


#: deprecated class names that method configs and evaluation progress files may give
__getattr__ = deprecated_names(__name__, {"PmetHParams": "PmetMethod"})
