"""M-ROME: rank-one edits of one layer's down-projection, one request after the other.

Usage::

    update = rome_edit(model, tok, requests_by_language(groups), RomeMethod(layer=6))

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
from .base import deprecated_names
from .run import ArtifactEditing
from .stats import key_second_moments


@dataclass
class RomeMethod(ArtifactEditing):
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


def _request_values(model, tokenizer, requests: dict, hp: RomeMethod, stats_dir, update: LowRankUpdate, log):
    """Per request, on the model with ``update`` as it is when the request comes: ``(request,
    whitened key direction u, optimised value z, bare-prompt key k*, current value W k*)``."""
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
                [z] = optimise_values(model, tokenizer, req, [("down", layer)], hp.value, prefixes)
                k_star, v_now = read_sites(model, tokenizer, [req], [("down", layer, "in"), ("down", layer, "out")])
            log(f"rome {lang} {req.subject!r} -> {req.target!r}: nll {z.final_nll:.3f} |delta| {z.delta.norm():.2f} |init| {z.init.norm():.2f}")
            yield req, u, z, k_star[0].double(), v_now[0].double()


def rome_edit(model, tokenizer, requests: dict, hp: RomeMethod, *, stats_dir=None, update: LowRankUpdate | None = None,
              log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    values = _request_values(model, tokenizer, requests, hp, stats_dir, update, log)
    if hp.joint:   # every value taken on the model before the batch, then one update
        rows = list(values)
        left, right = joint_update(torch.stack([u for _, u, _, _, _ in rows]), torch.stack([k for *_, k, _ in rows]),
                                   torch.stack([z.target.double() - v for _, _, z, _, v in rows]))
        update.add(hp.layer, left.float(), right.float())
        return update
    for _, u, z, k_star, v_now in values:   # each request on the model holding the earlier ones
        left = u / u.norm()
        right = (z.target.double() - v_now) / torch.dot(k_star, left)
        update.add(hp.layer, left.float(), right.float())
    return update


#: deprecated class names that method configs and evaluation progress files may give
__getattr__ = deprecated_names(__name__, {"RomeHParams": "RomeMethod"})
