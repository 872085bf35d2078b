"""Applying an edit cache at inference; the backbone's weights never change.

    edited = EditedModel.from_cache("edit_cache")             # backbone, dtype, site: from the cache
    logits = edited(**tokenizer(["Who founded ...?"], return_tensors="pt")).logits

A matched subject's group gets its ΔV at the subject's last token; any other row runs the
untouched backbone (identical logits). Cost and caching: docs/inference.md.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbone.ffn import SITES, adapter_for
from ..backbone.fingerprint import check_fingerprint, fingerprint
from ..backbone.loading import dtype_name, load_backbone
from ..cache import EditCache
from ..editing.injection import delta_hooks
from ..routing.keys import KEYS_FILE, KeyStore
from ..routing.router import Router
from ..routing.settings import READ_HINT, RoutingSettings
from ..routing.states import ids_states, normalize
from ..text.matching import SubjectMatcher
from ..text.spans import last_token_of_span, token_spans


@dataclass(frozen=True)
class EditSite:
    row: int
    position: int     # token index in the row (padding included)
    group_id: str
    subject: str




def _recorded(cache: EditCache, key: str, given, *, default):
    """The cache's recorded setting ``key``; ``given`` must agree with it (None: take the record)."""
    stored = (cache.settings or {}).get(key)
    if given is not None and stored is not None and str(given) != str(stored):
        raise ValueError(f"edit cache {cache.path} was made with {key}={stored!r}, but {key}={given!r} was given; "
                         f"drop the argument to use the cache's setting")
    return given if given is not None else stored if stored is not None else default


class EditedModel(nn.Module):
    """A causal LM with an edit cache applied by subject matching.

    Args:
        model: the Hugging Face causal LM the cache was built on (checked by fingerprint).
        tokenizer: its fast tokenizer.
        cache: an :class:`EditCache` or its directory.
        matcher: ``exact`` (the paper's), ``normalized``, ``fuzzy``, or ``router`` (the backbone's
            hidden states, keys in ``<cache>/router_keys.safetensors``: :mod:`lafn_lightning.routing`).
        site: ``value`` or ``activation``; default: the site the cache records (a different
            explicit value is refused: the edits were trained there).
        groups: restrict to these cached group ids (e.g. edit-one-test-one evaluation); ids not in
            the cache are ignored.
        delta_cache_size: how many matched groups' dense ΔV to keep in memory (LRU).
    """

    def __new__(cls, *args, matcher: str = "exact", **kwargs):
        if matcher == "router" and cls is EditedModel:  # hidden-state routing (lafn_lightning.routing)
            return super().__new__(RoutedEditedModel)
        return super().__new__(cls)

    def __init__(self, model, tokenizer, cache: EditCache | str | Path, *, matcher: str = "exact",
                 site: str | None = None, groups=None, delta_cache_size: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache if isinstance(cache, EditCache) else EditCache.open(cache)
        self.layers = list(self.cache.fingerprint["edited_layers"])
        check_fingerprint(self.cache.fingerprint, fingerprint(model, self.layers), f"edit cache {self.cache.path}")
        self.adapter = adapter_for(model)
        self.site = _recorded(self.cache, "site", site, default="value")
        if self.site not in SITES:
            raise ValueError(f"site={self.site!r}: one of {SITES}")
        if groups is None:
            subjects = self.cache.all_subjects()
        else:  # only the wanted groups: no pass over a large cache's manifest
            subjects = {g: list(dict.fromkeys(self.cache.subjects(g).values()))
                        for g in dict.fromkeys(groups) if g in self.cache}
            for g in subjects:  # refused now (missing shard, NaN/Inf ΔV: CacheError naming it), not mid-forward
                self.cache.entry(g)
        self.matcher = SubjectMatcher(subjects, mode=matcher)
        self._special = frozenset(tokenizer.all_special_ids)
        if delta_cache_size < 1:
            raise ValueError(f"delta_cache_size must be >= 1, got {delta_cache_size}")
        self.delta_cache_size = delta_cache_size
        self._deltas: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_cache(cls, cache_dir: str | Path, backbone: str | None = None, dtype: str | None = None,
                   **kwargs) -> "EditedModel":
        """Load the backbone (shared per process) and wrap it with the cache in ``cache_dir``.

        ``backbone``, ``dtype`` and ``site`` default to what the cache records (as PEFT reads its
        adapter config); an explicit value that conflicts with the record is refused.
        """
        cache = EditCache.open(cache_dir)
        spec = _recorded(cache, "backbone", backbone, default="demo")
        dtype = _recorded(cache, "dtype", None if dtype is None else dtype_name(dtype),
                          default=cache.fingerprint.get("dtype", "float32"))
        model, tokenizer = load_backbone(spec, dtype)
        return cls(model, tokenizer, cache, **kwargs)

    # ---- HF-like surface ------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def delta(self, group_id: str) -> torch.Tensor:
        """Dense ΔV [edited layers, d_ff] of one group (float32 on the model's device), read
        lazily from the cache and kept in an LRU of ``delta_cache_size`` groups."""
        return self._delta(group_id, self.device)

    def _delta(self, group_id: str, device: torch.device) -> torch.Tensor:
        d = self._deltas.get(group_id)
        if d is not None and d.device == device:
            self._deltas.move_to_end(group_id)
            return d
        d = self.cache.entry(group_id, device=device, dtype=torch.float32).delta
        self._deltas[group_id] = d
        self._deltas.move_to_end(group_id)
        while len(self._deltas) > self.delta_cache_size:
            self._deltas.popitem(last=False)
        return d

    def clear_delta_cache(self) -> None:
        """Forget the in-memory ΔV (e.g. after the cache on disk changed)."""
        self._deltas.clear()

    def find_sites(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[EditSite]:
        """Where cached subjects occur in each row (any padding side)."""
        sites = []
        if not len(self.matcher):
            return sites
        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else None
        for row, row_ids in enumerate(rows):
            if masks is None:
                index, ids = range(len(row_ids)), row_ids
            else:
                index = [i for i, m in enumerate(masks[row]) if m]
                ids = [row_ids[i] for i in index]
            text, spans = token_spans(self.tokenizer, ids, self._special)
            for m in self.matcher.find(text):
                tok = last_token_of_span(spans, m.start, m.end)
                if tok is not None:
                    sites.append(EditSite(row, index[tok], m.group_id, m.subject))
        return sites

    def _hooks(self, sites: list[EditSite], only_length: int | None = None):
        device = self.device
        rows = torch.tensor([s.row for s in sites], device=device)
        pos = torch.tensor([s.position for s in sites], device=device)
        values = torch.stack([self._delta(s.group_id, device) for s in sites])
        return delta_hooks(self.model, self.adapter, self.layers, self.site, rows, pos, values, only_length=only_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        sites = self.find_sites(input_ids, attention_mask)
        if not sites:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self._hooks(sites):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``model.generate`` with ΔV applied to the prompt's subject tokens during prefill only."""
        sites = self.find_sites(input_ids, attention_mask)
        if not sites:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self._hooks(sites, only_length=input_ids.shape[1]):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class RoutedEditedModel(EditedModel):
    """Args as :class:`EditedModel` plus ``keys`` (a :class:`KeyStore` or a key file; default
    ``<cache>/router_keys.safetensors``), ``routing`` (a :class:`RoutingSettings`: what it sets
    of ``threshold`` / ``lexical_threshold`` / ``lexical_tiers`` replaces the keys' recorded
    settings, its ``layer`` / ``common_from`` must equal theirs; None: the keys' settings, as the
    cache was built), ``stage1`` (the stage-1 matcher, or None) and ``index``
    (``auto``/``flat``/``hnsw``).

    >>> RoutedEditedModel(model, tok, "edit_cache", routing=RoutingSettings(threshold=0.95)).routing.threshold
    0.95
    """

    def __init__(self, model, tokenizer, cache, *, keys: KeyStore | str | Path | None = None,
                 routing: RoutingSettings | None = None, stage1: str | None = "exact",
                 index: str = "auto", **kwargs) -> None:
        kwargs.pop("matcher", None)
        super().__init__(model, tokenizer, cache, matcher="exact", **kwargs)
        where = "the given router keys"
        if not isinstance(keys, KeyStore):
            path = Path(keys or Path(self.cache.path) / KEYS_FILE)
            if not path.is_file():
                raise FileNotFoundError(f"matcher router: no router key file {path}; `lafn fit` writes it "
                                        "(routing.keys true); for a cache written without it, build it "
                                        "with lafn_lightning.routing.build.update_cache_keys")
            keys, where = KeyStore.load(path), f"router keys {path}"
        #: the settings this model routes with: the keys' record, with what ``routing`` sets over it
        self.routing = (routing or RoutingSettings()).over(keys.routing, where=where, hint=READ_HINT)
        if self.routing.threshold is None:
            raise ValueError(f"matcher router: {where} record no routing.threshold and none was given "
                             "(calibrate it as docs/router.md describes)")
        groups = kwargs.get("groups")
        wanted = [g for g in (self.cache.group_ids if groups is None else groups) if g in self.cache]
        keys.prune(wanted)
        subjects = {g: list(dict.fromkeys(self.cache.subjects(g).values())) for g in wanted}
        self.router = Router(keys, subjects, threshold=self.routing.threshold,
                             lexical_threshold=self.routing.lexical_threshold,
                             lexical_tiers=self.routing.lexical_tiers or (), common_from=self.routing.common_from,
                             stage1=stage1, index=index)

    def _kept(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[list[int], list[int]]]:
        rows = input_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else None
        kept = []
        for row, row_ids in enumerate(rows):
            index = range(len(row_ids)) if masks is None else [i for i, m in enumerate(masks[row]) if m]
            kept.append((list(index), [row_ids[i] for i in index]))
        return kept

    def find_sites(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[EditSite]:
        kept = self._kept(input_ids, attention_mask)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        states = ids_states(self.model, [ids for _, ids in kept], self.router.layer, pad_id=pad)
        return self._route(kept, states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """One pass: a pre-hook on the router's layer routes on the very states this forward
        computes there and attaches the ΔV hooks of the layers from there on (all edited layers
        are, when the router sits at the first one), so routing costs no second forward."""
        if self.router.layer > min(self.layers):
            return super().forward(input_ids, attention_mask, **kwargs)
        kept = self._kept(input_ids, attention_mask)
        blocks = self.model.get_submodule(self.adapter.layers_path)
        with ExitStack() as attached:
            def route(_module, args, kw):
                x = (args[0] if args else kw["hidden_states"]).detach()
                states = [normalize(x[r, index].float()).cpu() for r, (index, _) in enumerate(kept)]
                sites = self._route(kept, states)
                if sites:
                    attached.enter_context(self._hooks(sites))

            handle = blocks[self.router.layer].register_forward_pre_hook(route, with_kwargs=True)
            try:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            finally:
                handle.remove()

    def _route(self, kept, states) -> list[EditSite]:
        sites = []
        for row, ((index, ids), st) in enumerate(zip(kept, states)):
            text, spans = token_spans(self.tokenizer, ids, self._special)
            for r in self.router.route(text, spans, st):
                subject = text[spans[r.position][0]:spans[r.position][1]] if r.stage == "state" else ""
                sites.append(EditSite(row, index[r.position], r.group_id, subject))
        return sites


class RouterMatcher:
    """A :class:`~lafn_lightning.text.matching.SubjectMatcher` look-alike over a :class:`Router`
    (``find(text) -> [Match]``, the span being the routed token), so that
    ``match_report.measure(groups, "router", matcher=RouterMatcher(router, model, tok))`` and
    ``lafn match-report --matchers router`` can count its coverage like the string matchers'.

    >>> RouterMatcher(router, model, tok).find("Где находится Moskva?")   # [Match('moscow', ...)]
    """

    def __init__(self, router: Router, model, tokenizer) -> None:
        self.router, self.model, self.tokenizer = router, model, tokenizer

    def __len__(self) -> int:
        return len(self.router)

    def find(self, text: str):
        from ..routing.states import encode_with_offsets
        from ..text.matching import Match

        ids, spans = encode_with_offsets(self.tokenizer, text)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        states = ids_states(self.model, [ids], self.router.layer, pad_id=pad)[0]
        out = []
        for r in self.router.route(text, spans, states):
            a, b = spans[r.position]
            out.append(Match(r.group_id, text[a:b], a, b))
        return out
