"""Applying an edit cache at inference: the backbone's weights never change.

``EditedModel(backbone, tokenizer, cache)`` behaves like the wrapped Hugging Face causal LM. For
every input row it recovers the text, finds cached subjects (every subject of a group, in every
language) with a :class:`~lafn_lightning.matching.SubjectMatcher`, and adds the matched group's
ΔV to the neuron values at the subject's last token. A row with no match runs the untouched
backbone (identical logits). In ``generate`` ΔV is applied to the prompt once (prefill) and not
re-applied at decoding steps; the KV cache carries its effect.

Cost (see ``benchmarks/inference_overhead.py``): opening reads the manifest and builds the matcher
once; a query pays one decode + re-encode of its ids (the exact character offsets) and one
matcher lookup, whose cost does not grow with the number of cached edits. A matched group's ΔV
is read from its memory-mapped shard on first use and kept, densified on the model's device, in
a small LRU (``delta_cache_size`` groups), so memory does not grow with the number of distinct
groups ever matched. The backbone fingerprint is memoised per model and edited layers (keyed by
the layers' tensors' storage and version counters, so an in-place weight update is noticed).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import fingerprint, load_backbone
from .cache import EditCache, FingerprintMismatch, fingerprints_differ
from .ffn import adapter_for
from .injection import delta_hooks
from .matching import SubjectMatcher
from .prompts import last_token_of_span


@dataclass(frozen=True)
class EditSite:
    row: int
    position: int     # token index in the row (padding included)
    group_id: str
    subject: str


def token_spans(tokenizer, ids: list[int], special: frozenset[int] | set[int] | None = None
                ) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's character span in it (special tokens: empty span).

    Tries one decode + re-encode (exact when the tokenizer round-trips, the usual case for a
    tokenized text); otherwise decodes token by token with a few tokens of left context (linear in
    the length; a token that ends inside a character, e.g. a byte-fallback piece, shares the span
    of the character it completes), and only if that does not reassemble the text, prefix by
    prefix. ``special``: the tokenizer's special ids (computed when not given).
    """
    special = frozenset(tokenizer.all_special_ids) if special is None else special
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: no wrapper overhead
    if backend is not None:
        decode = backend.decode
        text = decode(ids, skip_special_tokens=True)
        enc = backend.encode(text, add_special_tokens=False)
        enc_ids, offsets = enc.ids, enc.offsets
    else:
        decode = tokenizer.decode
        text = decode(ids, skip_special_tokens=True)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        enc_ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    plain = [i for i in ids if i not in special]
    if enc_ids == plain:
        it = iter(offsets)
        return text, [(0, 0) if i in special else tuple(next(it)) for i in ids]
    spans = _incremental_spans(decode, ids, special, text)
    if spans is not None:
        return text, spans
    spans, prev = [], 0
    for n in range(1, len(ids) + 1):
        if ids[n - 1] in special:
            spans.append((prev, prev))
            continue
        end = len(decode(ids[:n], skip_special_tokens=True))
        spans.append((prev, end))
        prev = end
    return text, spans


_CONTEXT_TOKENS = 6


def _incremental_spans(decode, ids: list[int], special, text: str) -> list[tuple[int, int]] | None:
    """Spans by incremental detokenisation: the text a token adds is ``decode(ctx + tok)`` minus
    ``decode(ctx)`` for a few tokens of context ``ctx`` (so SentencePiece's leading-space rule and
    multi-token characters come out right). None if the pieces do not add up to ``text``."""
    spans: list[tuple[int, int] | None] = [None] * len(ids)
    pos = 0
    first = None  # first token of the pending run (not yet turned into text)
    for n, tok in enumerate(ids):
        if tok in special:
            spans[n] = (pos, pos)
            continue
        if first is None:
            first = n
        ctx = ids[max(0, first - _CONTEXT_TOKENS):first]
        prev = decode(ctx, skip_special_tokens=True) if ctx else ""
        full = decode(ctx + ids[first:n + 1], skip_special_tokens=True)
        if full.endswith("\ufffd") or not full.startswith(prev):
            continue  # ends inside a character: wait for the token that completes it
        piece = full[len(prev):]
        if text[pos:pos + len(piece)] != piece:
            return None
        for k in range(first, n + 1):
            if spans[k] is None:
                spans[k] = (pos, pos + len(piece))
        pos += len(piece)
        first = None
    if first is not None or pos != len(text):
        return None
    return spans  # type: ignore[return-value]


#: model -> {edited layers: (tensor signature, fingerprint)}
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _layer_signature(model: nn.Module, adapter, layers) -> tuple:
    first = next(model.parameters())
    sig: list = [str(getattr(model.config, "name_or_path", "")), type(model).__name__, first.dtype]
    for layer in sorted(int(i) for i in layers):
        module = adapter.layer_module(model, layer)
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            sig.append((layer, name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device)))
    return tuple(sig)


def cached_fingerprint(model: nn.Module, layers) -> dict:
    """:func:`~lafn_lightning.backbones.fingerprint`, memoised per model and layers while the
    layers' tensors are the same objects at the same version (in-place updates bump it)."""
    key = tuple(sorted(int(i) for i in layers))
    sig = _layer_signature(model, adapter_for(model), key)
    memo = _FINGERPRINTS.setdefault(model, {})
    hit = memo.get(key)
    if hit is not None and hit[0] == sig:
        return dict(hit[1])
    fp = fingerprint(model, key)
    memo[key] = (sig, fp)
    return dict(fp)


class EditedModel(nn.Module):
    """A causal LM with an edit cache applied by subject matching.

    Args:
        model: the Hugging Face causal LM the cache was built on (checked by fingerprint).
        tokenizer: its fast tokenizer.
        cache: an :class:`EditCache` or its directory.
        matcher: ``exact`` (the paper's), ``normalized`` or ``fuzzy``.
        site: ``value`` or ``activation``; must match the site used for training.
        groups: restrict to these cached group ids (e.g. edit-one-test-one evaluation); ids not in
            the cache are ignored.
        delta_cache_size: how many matched groups' dense ΔV to keep in memory (LRU).
    """

    def __init__(self, model, tokenizer, cache: EditCache | str | Path, *, matcher: str = "exact",
                 site: str = "value", groups=None, delta_cache_size: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache if isinstance(cache, EditCache) else EditCache.open(cache)
        self.layers = list(self.cache.fingerprint["edited_layers"])
        mine = cached_fingerprint(model, self.layers)
        diff = fingerprints_differ(self.cache.fingerprint, mine)
        if diff:
            raise FingerprintMismatch(
                f"edit cache {self.cache.path} was built on another backbone; differing: "
                + ", ".join(f"{k} (cache {a!r}, model {b!r})" for k, (a, b) in diff.items()), diff)
        self.adapter = adapter_for(model)
        self.site = site
        if groups is None:
            subjects = self.cache.all_subjects()
        else:  # only the wanted groups: no pass over a large cache's manifest
            subjects = {g: list(dict.fromkeys(self.cache.subjects(g).values()))
                        for g in dict.fromkeys(groups) if g in self.cache}
        self.matcher = SubjectMatcher(subjects, mode=matcher)
        self._special = frozenset(tokenizer.all_special_ids)
        if delta_cache_size < 1:
            raise ValueError(f"delta_cache_size must be >= 1, got {delta_cache_size}")
        self.delta_cache_size = delta_cache_size
        self._deltas: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_cache(cls, cache_dir: str | Path, backbone: str = "demo", dtype: str | None = None, **kwargs) -> "EditedModel":
        """Load the backbone (shared per process) and wrap it with the cache in ``cache_dir``.

        ``dtype``: the backbone's dtype; default: the one the cache's edits were trained with (a
        cache trained in bf16 needs the bf16 backbone: the fingerprint includes the dtype).
        """
        cache = EditCache.open(cache_dir)
        model, tokenizer = load_backbone(backbone, dtype or cache.fingerprint.get("dtype", "float32"))
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
