"""M-ROME: rank-one edits of one layer's down-projection, one request after the other.

Usage::

    update = rome_edit(model, tok, requests_by_language(groups), RomeHParams(layer=6))

Per request (Meng et al. 2022, ``rome_main.py``): u = C_l^{-1} k (k: mean key over prefixed
prompts, C_l: the key second moment of the request's language l), left = u / |u|; the value
v* at the down_proj output is optimised (``compute_z``); right = (v* - W k*) / (k* . left) with
k* the key of the bare prompt; W += right (x) left. Requests are applied sequentially (each
computed on the model with the earlier ones applied), so n requests give rank <= n.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .compute_z import ValueHParams, keys_at, optimise_values, prefix_groups, read_sites
from .lowrank import LowRankUpdate
from .run import ArtifactEditing
from .stats import key_second_moments


@dataclass
class RomeHParams(ArtifactEditing):
    layer: int = 6
    value: ValueHParams = field(default_factory=ValueHParams)
    #: (prefix length, count) pairs; ROME: [(5, 10), (10, 10)]
    prefixes: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_adjustment: bool = True
    mom2_n_samples: int = 2000

    name = "rome"

    def edit(self, model, tokenizer, requests: dict, **kwargs) -> LowRankUpdate:
        """``rome_edit(model, tokenizer, requests, self, **kwargs)`` (the config's ``class_path`` entry point)."""
        return rome_edit(model, tokenizer, requests, self, **kwargs)


def rome_edit(model, tokenizer, requests: dict, hp: RomeHParams, *, stats_dir=None, update: LowRankUpdate | None = None,
              log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    layer = hp.layer
    for lang, reqs in requests.items():
        C = None
        if hp.mom2_adjustment:
            C = key_second_moments(model, tokenizer, [layer], lang, n_samples=hp.mom2_n_samples,
                                   stats_dir=stats_dir)[layer].double()
        prefixes = prefix_groups(model, tokenizer, lang, hp.prefixes)
        for req in reqs:
            with update.applied(model):
                u = keys_at(model, tokenizer, req, [layer], prefixes)[layer].double()
                if C is not None:
                    u = torch.linalg.solve(C, u)
                left = u / u.norm()
                [z] = optimise_values(model, tokenizer, req, [("down", layer)], hp.value, prefixes)
                k_star, v_now = read_sites(model, tokenizer, [req], [("down", layer, "in"), ("down", layer, "out")])
            right = (z.target.double() - v_now[0].double()) / torch.dot(k_star[0].double(), left)
            update.add(layer, left.float(), right.float())
            log(f"rome {lang} {req.subject!r} -> {req.target!r}: nll {z.final_nll:.3f} |delta| {z.delta.norm():.2f} |init| {z.init.norm():.2f}")
    return update
