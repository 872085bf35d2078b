"""M-ROME: rank-one edits of one layer's down-projection, one request after the other.

Usage::

    update = rome_edit(model, tok, requests_by_language(groups), RomeHParams(layer=6))

Per request (Meng et al. 2022, ``rome_main.py``): u = C_l^{-1} k (k: mean key over prefixed
prompts, C_l: the key second moment of the request's language l), left = u / |u|; the value
v* at the down_proj output is optimised (``compute_z``); right = (v* - W k*) / (k* . left) with
k* the key of the bare prompt; W += right (x) left. Requests are applied sequentially (each
computed on the model with the earlier ones applied), so n requests give rank <= n.

``joint: true`` writes the batch's values at once instead (every value and key taken on the model
before the batch): with U = [C_l^-1 k_l] (each request's whitened key direction, its language's
statistics), K* = [k*] and R = [v* - W k*], delta W = R^T (U K*^T)^-1 U, the one update in the
span of the whitened directions that writes every value exactly (:func:`joint_update`; for one
request it is ROME's rank-one update). Sequential edits of one fact's languages at one layer
rewrite each other (their whitened directions reach cosine 0.65 on the demo backbone,
docs/locate_then_edit.md); the joint update does not.
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
    #: write all requests of the batch in one update (see the module docstring); false: ROME's sequence
    joint: bool = False

    name = "rome"

    def edit(self, model, tokenizer, requests: dict, **kwargs) -> LowRankUpdate:
        """``rome_edit(model, tokenizer, requests, self, **kwargs)`` (the config's ``class_path`` entry point)."""
        return rome_edit(model, tokenizer, requests, self, **kwargs)


def joint_update(U: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(left [n, d_ff], right [n, d_out])`` of ``delta W = R^T (U K^T)^-1 U``: the update
    in the row span of ``U`` (whitened key directions) with ``delta W k_i = r_i`` for every row
    ``k_i`` of ``K`` and ``r_i`` of ``R``.

    >>> U = K = torch.eye(3)[:2].double(); R = torch.ones(2, 4).double()
    >>> left, right = joint_update(U, K, R); torch.allclose((right.T @ left) @ K.T, R.T)
    True
    """
    A = U @ K.T                                                # [n, n]
    left = torch.linalg.lstsq(A, U).solution if torch.linalg.matrix_rank(A) < len(A) else torch.linalg.solve(A, U)
    return left, R


def rome_edit(model, tokenizer, requests: dict, hp: RomeHParams, *, stats_dir=None, update: LowRankUpdate | None = None,
              log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    if hp.joint:
        return _rome_joint(model, tokenizer, requests, hp, stats_dir=stats_dir, update=update, log=log)
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


def _rome_joint(model, tokenizer, requests: dict, hp: RomeHParams, *, stats_dir, update: LowRankUpdate,
                log) -> LowRankUpdate:
    layer = hp.layer
    U, zs, reqs_all = [], [], []
    with update.applied(model):
        for lang, reqs in requests.items():
            C = None
            if hp.mom2_adjustment:
                C = key_second_moments(model, tokenizer, [layer], lang, n_samples=hp.mom2_n_samples,
                                       stats_dir=stats_dir)[layer].double()
            prefixes = prefix_groups(model, tokenizer, lang, hp.prefixes)
            for req in reqs:
                u = keys_at(model, tokenizer, req, [layer], prefixes)[layer].double()
                U.append(torch.linalg.solve(C, u) if C is not None else u)
                [z] = optimise_values(model, tokenizer, req, [("down", layer)], hp.value, prefixes)
                zs.append(z.target.double())
                reqs_all.append(req)
                log(f"rome {lang} {req.subject!r} -> {req.target!r}: nll {z.final_nll:.3f} |delta| {z.delta.norm():.2f} |init| {z.init.norm():.2f}")
        k_star, v_now = read_sites(model, tokenizer, reqs_all, [("down", layer, "in"), ("down", layer, "out")])
    left, right = joint_update(torch.stack(U), k_star.double(), torch.stack(zs) - v_now.double())
    update.add(layer, left.float(), right.float())
    log(f"rome joint: {len(reqs_all)} requests written at layer {layer}")
    return update
