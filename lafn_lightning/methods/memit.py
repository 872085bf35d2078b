"""M-MEMIT: least-squares edits spread over several layers' down-projections, one batch per language.

Usage::

    update = memit_edit(model, tok, requests_by_language(groups), MemitMethod(layers=[4, 5, 6, 7, 8]))

Per language l (Meng et al. 2023, ``memit_main.py``): z_i at the residual stream output of the
last edit layer is optimised per request (``compute_z``); then for each layer in order, with the
earlier layers' updates applied: K = keys (mean over prefixed prompts), R = (z - current z) /
(layers left), delta W = R K^T (lambda C_l + K K^T)^{-1}. Languages are edited one after the other
(the second on the model edited by the first), each with its own statistics C_l;
``joint_languages: true`` solves all languages' requests at once with the mean of their C_l.
Where the FFN output passes through a post-FFN norm before the residual (Gemma 2/3), R is
converted to down_proj-output units with the norm's local scale ``rms(y) / gain`` (see
:func:`residual_to_down`), which the original (GPT-J/Llama, no post-norm) does not need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbone.ffn import adapter_for
from .compute_z import ValueHParams, keys_at, optimise_values, prefix_groups, read_sites
from .lowrank import LowRankUpdate
from .base import deprecated_names
from .run import ArtifactEditing
from .stats import key_second_moments


@dataclass
class MemitMethod(ArtifactEditing):
    layers: list = field(default_factory=lambda: [4, 5, 6, 7, 8])
    value: ValueHParams = field(default_factory=ValueHParams)
    #: MEMIT: [["{}"], five prefixes of length 10]
    prefixes: list = field(default_factory=lambda: [[10, 5]])
    mom2_update_weight: float = 15000.0
    mom2_n_samples: int = 2000
    #: one least-squares solve for all languages' requests, with the mean of their statistics C_l
    #: (false: the languages one after the other, each with its own C_l)
    joint_languages: bool = False

    name = "memit"

    def edit(self, model, tokenizer, requests: dict, **kwargs) -> LowRankUpdate:
        """``memit_edit(model, tokenizer, requests, self, **kwargs)`` (the config's ``class_path`` entry point)."""
        return memit_edit(model, tokenizer, requests, self, **kwargs)


def _post_ffn_norm(model, layer: int):
    return getattr(adapter_for(model).layer_module(model, layer), "post_feedforward_layernorm", None)


@torch.no_grad()
def down_to_residual(model, layer: int, y: torch.Tensor) -> torch.Tensor:
    """What FFN output ``y`` (down_proj units) adds to the residual stream at ``layer``: the post-FFN
    norm of ``y`` where there is one (Gemma 2/3), else ``y``."""
    norm = _post_ffn_norm(model, layer)
    if norm is None:
        return y
    return norm(y.to(norm.weight)).to(y)


def residual_to_down(model, layer: int, y: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The down_proj-output change giving (to first order) residual change ``resid`` at layer
    ``layer`` when the FFN output ``y`` passes a post-FFN RMSNorm (Gemma 2/3): ``resid * rms(y) /
    gain`` (first order, damped where the gain is ~0); else ``resid`` unchanged."""
    norm = _post_ffn_norm(model, layer)
    if norm is None:
        return resid
    w = norm.weight.detach().double().cpu()
    gain = 1.0 + w if "Gemma" in type(norm).__name__ else w
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
    rms = (y.double().pow(2).mean(-1, keepdim=True) + eps).sqrt()
    # 1/gain, regularised: a quantised gain can be exactly 0 (Gemma-3-270M layer 4: 18 of 640
    # dimensions below 0.05, median 5.7), which no FFN output can move
    damp = (0.1 * gain.abs().median()) ** 2
    return resid * rms * gain / (gain ** 2 + damp)


def spread(model, tokenizer, reqs, hp, prefixes, writes, update, *, scale, log=print):
    """MEMIT/PMET's layer loop. ``writes``: ``[(module, z_site, C_by_layer, z_targets), ...]``; for
    each layer of ``hp.layers`` in order and each write, with the updates so far applied: K = the
    requests' keys at ``module``'s input, R = (z_targets - current value at ``z_site``) / ``scale(i)``,
    delta W = R K^T (lambda C + K K^T)^-1 added to ``module`` (``down`` or ``o_proj``) of that layer.
    ``prefixes``: one list of prefix groups, or language -> prefix groups.

    Where FFN outputs pass a post-FFN norm (Gemma 2/3), R is taken in residual-stream units and
    converted to the layer's down_proj units (:func:`residual_to_down`): for a ``residual`` site
    as is; for a ``down`` site (PMET) the difference of the two values after that site's norm
    (:func:`down_to_residual`), since a layer-8 FFN-output change written into layer 4's
    down_proj passes layer 4's norm, not layer 8's. Without post-FFN norms both are the original."""

    def by_lang(req):
        return prefixes[req.language] if isinstance(prefixes, dict) else prefixes

    for i, layer in enumerate(hp.layers):
        for module, (z_kind, z_layer), C_by_layer, z_targets in writes:
            with update.applied(model):
                K = torch.stack([keys_at(model, tokenizer, req, [layer], by_lang(req), module)[layer]
                                 for req in reqs]).double()
                cur_z, y = read_sites(model, tokenizer, reqs, [(z_kind, z_layer, "out"), ("down", layer, "out")])
            target, cur = z_targets, cur_z
            ffn_target = z_kind == "down" and module == "down"
            if ffn_target:   # compare in residual-stream units (identity without post-FFN norms)
                target, cur = down_to_residual(model, z_layer, target), down_to_residual(model, z_layer, cur)
            R = (target.double() - cur.double()) / scale(i)
            if z_kind == "residual" or ffn_target:
                R = residual_to_down(model, layer, y, R)
            C = C_by_layer[layer].double()
            adj = torch.linalg.solve(hp.mom2_update_weight * C + K.T @ K, K.T)   # [d_in, n]
            update.add(layer, adj.T.float(), R.float(), module)
            log(f"layer {layer} {module}: |z - cur| {(z_targets - cur_z).norm(dim=-1).mean():.2f} "
                f"|R| {R.norm(dim=-1).mean():.2f}")
    return update


def mean_statistics(model, tokenizer, hp, languages, *, stats_dir=None, module: str = "down") -> dict:
    """``{layer: C}``: the mean over ``languages`` of each language's key second moments at
    ``module``'s input (one language: its own statistics)."""
    C = [key_second_moments(model, tokenizer, hp.layers, lang, n_samples=hp.mom2_n_samples, stats_dir=stats_dir,
                            module=module) for lang in languages]
    return {layer: sum(c[layer] for c in C) / len(C) for layer in hp.layers}


def memit_edit(model, tokenizer, requests: dict, hp: MemitMethod, *, stats_dir=None,
               update: LowRankUpdate | None = None, log=print) -> LowRankUpdate:
    update = update if update is not None else LowRankUpdate()
    z_site = ("residual", hp.layers[-1])
    n = len(hp.layers)
    batches = [requests] if hp.joint_languages else [{lang: reqs} for lang, reqs in requests.items()]
    for batch in batches:
        C_batch = mean_statistics(model, tokenizer, hp, list(batch), stats_dir=stats_dir)
        prefixes = {lang: prefix_groups(model, tokenizer, lang, hp.prefixes) for lang in batch}
        reqs = [req for rs in batch.values() for req in rs]
        with update.applied(model):
            zs = []
            for req in reqs:
                [z] = optimise_values(model, tokenizer, req, [z_site], hp.value, prefixes[req.language])
                zs.append(z.target)
                log(f"memit z {req.language} {req.subject!r} -> {req.target!r}: nll {z.final_nll:.3f} "
                    f"|delta| {z.delta.norm():.2f} |init| {z.init.norm():.2f}")
        spread(model, tokenizer, reqs, hp, prefixes, [("down", z_site, C_batch, torch.stack(zs))], update,
               scale=lambda i: float(n - i), log=log)
    return update


#: deprecated class names that method configs and evaluation progress files may give
__getattr__ = deprecated_names(__name__, {"MemitHParams": "MemitMethod"})
