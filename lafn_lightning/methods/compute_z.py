"""Value optimisation of ROME/MEMIT/PMET ("compute_v" / "compute_z"), one request at a time.

Usage::

    prefixes = prefix_groups(model, tok, "zh", [(5, 2)])          # [[""], [two sampled prefixes]]
    [z] = optimise_values(model, tok, request, [("residual", 8)], ValueHParams(), prefixes)
    z.target                                                       # the new hidden state at the site
    keys = keys_at(model, tok, request, [6], prefixes)[6]          # mean down_proj input (compute_ks)

A delta vector per site is added at the subject's last token of every row (prefix + question +
answer, and the KL anchor); loss = NLL of the answer + kl_factor * KL at the anchor + weight decay,
Adam, norm clamp, as in the originals. Sites: ``down`` (down_proj output), ``residual`` (decoder
layer output), ``attn`` (attention block output), ``o_proj`` (its output projection). Layers below
the lowest site run once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbone.ffn import adapter_for
from ..backbone.hooks import Hooks
from ..editing.lower_layers import LowerLayers
from ..editing.prompts import anchor_text, encode_edit_text, sample_prefixes


@dataclass
class ValueHParams:
    """Hyper-parameters of the value optimisation (EasyEdit names)."""

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2


@dataclass
class SiteValue:
    init: torch.Tensor      # the unedited value at the site (bare prompt, subject's last token)
    delta: torch.Tensor
    final_nll: float

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def prefix_groups(model, tokenizer, language: str, spec: Sequence[Sequence[int]], seed: int = 0) -> list[list[str]]:
    """``[[""], prefixes of length l1, ...]`` for ``spec = [(length, count), ...]`` (ROME's context
    templates, sampled in ``language``)."""
    groups = [[""]]
    for length, count in spec:
        groups.append(sample_prefixes(model, tokenizer, language, int(count), int(length), seed=seed))
    return groups


def site_module(model, kind: str, layer: int):
    adapter = adapter_for(model)
    if kind in ("down", "o_proj"):
        return adapter.linear_module(model, kind, layer)
    if kind == "residual":
        return adapter.layer_module(model, layer)
    if kind == "attn":
        return adapter.attn_module(model, layer)
    raise ValueError(f"unknown site {kind!r}: down, o_proj, residual or attn")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@dataclass
class _Rows:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    types: list[int]
    sel_rows: torch.Tensor      # (row, position) whose logits are needed: answer predictions, then the anchor
    sel_pos: torch.Tensor
    labels: torch.Tensor        # labels of the answer predictions
    label_rows: torch.Tensor


def _rows(tokenizer, request, prefixes: list[list[str]], *, with_target: bool, kl: bool, device) -> _Rows:
    subjects = request.subjects or (request.subject,)
    encs, types = [], []
    for t, group in enumerate(prefixes):
        for prefix in group:
            encs.append(encode_edit_text(tokenizer, prefix, request.prompt, request.target if with_target else None,
                                         request.subject, subjects))
            types.append(t)
    if kl:
        encs.append(encode_edit_text(tokenizer, "", anchor_text(request.language, request.subject), None,
                                     request.subject, (request.subject,)))
        types.append(-1)
    width = max(len(e.input_ids) for e in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, pos, labels = [], [], []
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        for t in e.target_positions:
            rows.append(i), pos.append(t - 1), labels.append(e.input_ids[t])
    n_t = len(rows)
    if kl:
        rows.append(len(encs) - 1), pos.append(encs[-1].subject_pos)
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return _Rows(ids.to(device), mask.to(device), as_t([e.subject_pos for e in encs]), types,
                 as_t(rows), as_t(pos), as_t(labels), as_t(rows[:n_t]))


def optimise_values(model, tokenizer, request, sites: Sequence[tuple[str, int]], hp: ValueHParams,
                    prefixes: list[list[str]], clamp: Sequence[float] | None = None) -> list[SiteValue]:
    """Optimise one delta per site jointly (PMET: attention and FFN) so the model answers ``request.target``.
    ``clamp``: a norm-clamp factor per site (default ``hp.clamp_norm_factor`` for every site; 0 keeps
    that site's delta at zero)."""
    clamp = [hp.clamp_norm_factor] * len(sites) if clamp is None else list(clamp)
    if len(clamp) != len(sites):
        raise ValueError(f"clamp: {len(clamp)} factors for {len(sites)} sites")
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    r = _rows(tokenizer, request, prefixes, with_target=True, kl=True, device=device)
    n_rows = r.input_ids.shape[0]
    row_idx = torch.arange(n_rows, device=device)
    inits: list[torch.Tensor | None] = [None] * len(sites)
    deltas: list[torch.Tensor | None] = [None] * len(sites)

    def edit(i):
        def fn(out):
            h = _first(out)
            if inits[i] is None:
                inits[i] = h[0, r.subject_pos[0]].detach().float().clone()
                deltas[i] = torch.zeros_like(inits[i], requires_grad=True)
            d = deltas[i].to(h.dtype).expand(n_rows, -1)
            return _with_first(out, h.index_put((row_idx, r.subject_pos), d, accumulate=True))
        return fn

    def select(x):
        return x[r.sel_rows, r.sel_pos].unsqueeze(0)

    def forward():
        return model(input_ids=r.input_ids, attention_mask=r.attention_mask, use_cache=False).logits[0].float()

    first = min(layer for _, layer in sites)
    lower = LowerLayers(model, adapter, first) if first > 0 else None
    n_t = r.labels.numel()
    counts = torch.bincount(r.label_rows, minlength=n_rows).clamp(min=1).float()
    with Hooks() as hooks:
        for i, (kind, layer) in enumerate(sites):
            hooks.on_output(site_module(model, kind, layer), edit(i))
        hooks.on_input(model.get_output_embeddings(), select)
        if lower is not None:
            hidden, logits0 = lower.capture(forward)
        else:
            with torch.no_grad():
                logits0 = forward()
        kl_init = torch.log_softmax(logits0[n_t:], -1).detach()
        opt = torch.optim.Adam(deltas, lr=hp.v_lr)
        nll_value = float("nan")
        with (lower.skipping(hidden) if lower is not None else contextlib.nullcontext()), torch.enable_grad():
            for it in range(hp.v_num_grad_steps):
                logp = torch.log_softmax(forward(), -1)
                tok_lp = logp[:n_t].gather(1, r.labels[:, None])[:, 0]
                per_row = torch.zeros(n_rows, device=device).index_add(0, r.label_rows, tok_lp) / counts
                nll = -per_row[torch.unique(r.label_rows)].mean()
                kl = hp.kl_factor * F.kl_div(kl_init, logp[n_t:], log_target=True, reduction="batchmean")
                wd = sum(hp.v_weight_decay * d.norm() / inits[i].norm() ** 2 for i, d in enumerate(deltas))
                loss = nll + kl + wd
                nll_value = float(nll.detach())
                if float(loss.detach()) < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for i, d in enumerate(deltas):
                        max_norm = clamp[i] * inits[i].norm()
                        if d.norm() > max_norm:
                            d.mul_(max_norm / d.norm())
    return [SiteValue(inits[i], deltas[i].detach().clone(), nll_value) for i in range(len(sites))]


@torch.no_grad()
def keys_at(model, tokenizer, request, layers: Sequence[int], prefixes: list[list[str]],
            module: str = "down") -> dict[int, torch.Tensor]:
    """Mean input of ``module`` (down_proj, or o_proj) at the subject's last token over the prefixed
    prompts: the mean within each prefix length, then over lengths (ROME compute_u / MEMIT compute_ks)."""
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    r = _rows(tokenizer, request, prefixes, with_target=False, kl=False, device=device)
    rows = torch.arange(r.input_ids.shape[0], device=device)
    seen: dict[int, torch.Tensor] = {}
    with Hooks() as hooks:
        for layer in layers:
            hooks.on_input(adapter.linear_module(model, module, layer),
                           lambda x, layer=layer: seen.__setitem__(layer, x[rows, r.subject_pos].float()))
        model(input_ids=r.input_ids, attention_mask=r.attention_mask, use_cache=False, logits_to_keep=1)
    types = torch.tensor(r.types)
    out = {}
    for layer in layers:
        k = seen[layer].cpu()
        out[layer] = torch.stack([k[types == t].mean(0) for t in sorted(set(r.types))]).mean(0)
    return out


@torch.no_grad()
def read_sites(model, tokenizer, requests, reads: Sequence[tuple[str, int, str]]) -> list[torch.Tensor]:
    """For the bare questions of ``requests`` (no prefix), the values at the subject's last token:
    ``reads = [(site kind, layer, "in" | "out"), ...]`` -> one [n_requests, d] tensor each."""
    device = next(model.parameters()).device
    encs = [_rows(tokenizer, req, [[""]], with_target=False, kl=False, device=device) for req in requests]
    out: list[list[torch.Tensor]] = [[] for _ in reads]
    for r in encs:
        seen: dict[int, torch.Tensor] = {}
        with Hooks() as hooks:
            for j, (kind, layer, side) in enumerate(reads):
                module = site_module(model, kind, layer)
                pick = lambda x, j=j: seen.__setitem__(j, _first(x)[0, r.subject_pos[0]].float().cpu())  # noqa: E731
                (hooks.on_input if side == "in" else hooks.on_output)(module, pick)
            model(input_ids=r.input_ids, attention_mask=r.attention_mask, use_cache=False, logits_to_keep=1)
        for j in range(len(reads)):
            out[j].append(seen[j])
    return [torch.stack(v) for v in out]
