"""Building the router's keys from what an edit group already has, and calibrating its threshold.

    store = new_store(model, tok, layer=4, fingerprint=fp, background=zsre_questions)
    sites = add_group(model, tok, store, group)      # keys: anchors + edit prompts, 12 languages
    store.threshold = calibrate(model, tok, Router(store, subjects, threshold=1.0), negatives)

A group's keys are its states at the subject's last token in ``"{subject} is a"`` (the KL anchor
text, every language) and in each edit prompt at the training site: ``prompts.subject_span``
(own/other/fuzzy), or where that falls back to the last token, the prompt's token closest to the
group's anchor keys (:func:`aligned_token`, rule ``"aligned"``) -- pass that position to training
so the ΔV sits where the router fires at inference. An aligned prompt's words ending at that token
become the group's **alias** (:func:`mention_alias`): the prompt's own wording of the subject
(«Вызовите доктора» for the subject "Позвонить доктору"), which the router's lexical rule then
accepts like a subject, so the key can fire where the prompt is asked again.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from functools import lru_cache
from collections.abc import Mapping, Sequence

import torch

from ..text.matching import _is_spaced_word_char
from ..text.scripts import mostly_unspaced
from ..text.spans import last_token_of_span
from ..text.subjects import anchor_text, subject_span
from .keys import KeyStore
from .lexical import QuestionGramIndex, background_facts, fold, lexical_support
from .router import Router, calibrate_threshold, site_tokens
from .settings import RoutingSettings
from .states import encode_with_offsets, ids_states

__all__ = ["new_store", "aligned_token", "word_end", "group_keys", "group_aliases", "mention_alias", "add_group",
           "negative_scores", "calibrate", "background_questions", "background_fact_questions", "background_fact_index",
           "set_background_facts", "standard_store", "update_cache_keys", "extend_cache_keys", "store_for_groups"]


def _states(model, tokenizer, texts: Sequence[str], layer: int):
    encs = [encode_with_offsets(tokenizer, t) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return encs, ids_states(model, [e[0] for e in encs], layer, pad_id=pad)


def new_store(model, tokenizer, layer: int, background: Sequence[str], fingerprint: dict | None = None) -> KeyStore:
    """An empty :class:`KeyStore` whose centring vector is the mean unit state (BOS excluded) of
    ``background`` texts (ordinary questions, e.g. a few hundred zsre-train lines per language)."""
    encs, states = _states(model, tokenizer, background, layer)
    rows = [s[1:] for s in states if len(s) > 1]
    center = torch.cat(rows).mean(0)
    return KeyStore(layer, fingerprint, center=center)


def aligned_token(states: torch.Tensor, spans, anchor_keys: torch.Tensor, text: str | None = None) -> int:
    """The non-special token whose (projected) state is closest to any anchor key; with the
    query ``text``, moved to the last token of its word when it ends inside one ("Gard|ner":
    "ner"), so that the key, training's site and the alias (:func:`mention_alias`) all sit where a
    mention of the word ends."""
    cand = site_tokens(spans)
    sim = (states[cand] @ anchor_keys.T).max(1).values
    pos = cand[int(sim.argmax())]
    if text is not None:
        a, b = spans[pos]
        end = word_end(text, b)
        if end != b:
            pos = last_token_of_span(spans, a, end)
    return pos


def word_end(text: str, end: int) -> int:
    """``end`` moved past the rest of the word it falls inside (letters and digits of scripts
    written with spaces; a script without spaces has no word ends to find).

    >>> word_end("Where is Gardner Inlet?", 13), word_end("Where is Gardner Inlet?", 16)
    (16, 16)
    """
    while 0 < end < len(text) and _is_spaced_word_char(text[end - 1]) and _is_spaced_word_char(text[end]):
        end += 1
    return end


def group_keys(model, tokenizer, store: KeyStore, group) -> tuple[torch.Tensor, list[tuple[str, int, str]]]:
    """``(keys [n, d], sites)`` of an :class:`~lafn_lightning.data.EditGroup`: ``sites`` lists
    ``(language, token index, rule)`` of each edit prompt's key (rule own/other/fuzzy/aligned)."""
    langs = list(group.edits)
    texts = [anchor_text(l, group.edits[l].subject) for l in langs] + [group.edits[l].prompt for l in langs]
    encs, states = _states(model, tokenizer, texts, store.layer)
    keys, sites = [], []
    for k, l in enumerate(langs):
        pos = last_token_of_span(encs[k][1], 0, len(group.edits[l].subject))
        keys.append(store.project(states[k][pos]))
    anchors = torch.stack(keys)
    for k, l in enumerate(langs):
        (_, spans), st = encs[len(langs) + k], store.project(states[len(langs) + k])
        s0, s1, rule = subject_span(group.edits[l].prompt, group.edits[l].subject, group.subjects)
        if rule == "fallback":
            pos, rule = aligned_token(st, spans, anchors, group.edits[l].prompt), "aligned"
        else:
            pos = last_token_of_span(spans, s0, s1)
        keys.append(st[pos])
        sites.append((l, pos, rule))
    return torch.stack(keys), sites


def mention_alias(prompt: str, end: int, subject: str) -> str:
    """The words of ``prompt`` ending at character ``end`` (an aligned key's token), as many as
    ``subject`` has (characters, for scripts written without spaces).

    >>> mention_alias("Какой художник создал «Вызовите доктора»?", 40, "Позвонить доктору")
    '«Вызовите доктора»'
    >>> mention_alias("加德纳海湾 is Gardner Inlet?", 16, "加德纳海湾")   # words where the mention has them
    'Gardner'
    """
    head = prompt[:end]
    window = head[-len(subject):]
    if mostly_unspaced(fold(subject)) and mostly_unspaced(fold(window)):
        return window.strip()
    return " ".join(head.split()[-max(1, len(fold(subject).split())):])


@lru_cache(maxsize=1)
def _background_texts() -> tuple[str, ...]:
    return tuple(background_questions())


def group_aliases(tokenizer, group, sites, *, min_share: float = 0.5, max_common: int = 1,
                  background: Sequence[str] | None = None) -> list[str]:
    """The aliases of a group: :func:`mention_alias` at each ``aligned`` site of ``sites``
    (:func:`group_keys`), except those that ordinary questions spell too: an alias reaching
    ``min_share`` (the router's ``lexical_min``) in more than ``max_common`` of the ``background``
    questions (default :func:`background_questions`) would let its key fire on any such question
    (an aligned key on a question's first word has cosine 1 on every question that opens alike)."""
    background = _background_texts() if background is None else background
    out = []
    for lang, pos, rule in sites:
        if rule != "aligned":
            continue
        prompt = group.edits[lang].prompt
        _, spans = encode_with_offsets(tokenizer, prompt)
        alias = mention_alias(prompt, spans[pos][1], group.edits[lang].subject)
        if fold(alias) and sum(lexical_support(q, [alias]) >= min_share for q in background) <= max_common:
            out.append(alias)
    return list(dict.fromkeys(out))


def add_group(model, tokenizer, store: KeyStore, group) -> list[tuple[str, int, str]]:
    """Compute and store a group's keys and aliases; returns the edit prompts' sites (see
    :func:`group_keys`)."""
    keys, sites = group_keys(model, tokenizer, store, group)
    store.add(group.group_id, keys, aliases=group_aliases(tokenizer, group, sites))
    return sites


def negative_scores(model, tokenizer, router: Router, texts: Sequence[str]) -> list[float]:
    """Best stage-2 cosine of each text (questions about facts that are NOT cached)."""
    encs, states = _states(model, tokenizer, texts, router.layer)
    out = []
    for (ids, spans), st in zip(encs, states):
        best = router.scores(st, site_tokens(spans))
        out.append(max((s for s, _ in best.values()), default=-1.0))
    return out


def calibrate(model, tokenizer, router: Router, negatives: Sequence[str], false_rate: float = 0.0025) -> float:
    """The stage-2 threshold that lets through at most ``false_rate`` of ``negatives``."""
    return calibrate_threshold(negative_scores(model, tokenizer, router, negatives), false_rate)


def rule_counts(sites) -> Counter:
    return Counter(rule for _, _, rule in sites)


def anchor_keys(model, tokenizer, store: KeyStore, group) -> torch.Tensor:
    """The group's anchor keys (subject's last token in ``"{subject} is a"``, every language)."""
    langs = list(group.edits)
    encs, states = _states(model, tokenizer, [anchor_text(l, group.edits[l].subject) for l in langs], store.layer)
    return torch.stack([store.project(st[last_token_of_span(spans, 0, len(group.edits[l].subject))])
                        for l, (_, spans), st in zip(langs, encs, states)])


def routed_subject_span(model, tokenizer, store: KeyStore, question: str, own_subject: str, group_subjects,
                        anchors: torch.Tensor) -> tuple[int, int, str]:
    """``prompts.subject_span`` with its last-token fallback replaced by the router's site: the
    character span of the question's token closest to the group's ``anchors`` (rule
    ``"aligned"``). Training should attach ΔV here, where the router fires at inference.

    >>> routed_subject_span(model, tok, store, "Когда возникла инициатива ИААФ?", "Соревнования ИААФ", subs, anchors)
    """
    s0, s1, rule = subject_span(question, own_subject, group_subjects)
    if rule != "fallback":
        return s0, s1, rule
    (ids, spans), st = [x[0] for x in _states(model, tokenizer, [question], store.layer)]
    a, b = spans[aligned_token(store.project(st), spans, anchors, question)]
    return a, b, "aligned"


def background_questions() -> list[str]:
    """The ordinary questions that centre every key store of a backbone: zsRE training lines
    0, 2, ..., 148 of each MzsRE language (the calibration in docs/router.md used exactly these),
    so that stores built by different fits share one centring vector and can be merged."""
    from ..data import MZSRE_LANGUAGES
    from ..data.packaged import read_zsre_train

    return [q for lang in MZSRE_LANGUAGES for q, _ in read_zsre_train(lang, limit=150)[::2] if q]


@lru_cache(maxsize=1)
def background_fact_questions() -> tuple[tuple[int, str], ...]:
    """``(line, question)`` for every packaged zsRE training line of every MzsRE language (10,000
    facts, 120,000 questions): the background that tells a common subject from a specific one
    (:func:`~lafn_lightning.routing.lexical.background_facts`, ``Router(common_from=)``)."""
    from ..data import MZSRE_LANGUAGES
    from ..data.packaged import read_zsre_train

    return tuple((i, q) for lang in MZSRE_LANGUAGES for i, (q, _) in enumerate(read_zsre_train(lang)) if q)


@lru_cache(maxsize=1)
def background_fact_index() -> QuestionGramIndex:
    """:func:`background_fact_questions` indexed by n-gram, once per process (a few seconds on
    one CPU core; every later export of the process looks its subjects up in milliseconds)."""
    return QuestionGramIndex(background_fact_questions())


def set_background_facts(store: KeyStore, subjects: Mapping[str, Sequence[str]],
                         own: Mapping[str, int] | None = None) -> None:
    """Store, for the groups of ``subjects`` (group id -> subject strings), how many background
    facts spell their subjects or stored aliases (:func:`background_fact_index`); ``own``: as
    :func:`~lafn_lightning.routing.lexical.background_facts`."""
    forms = {g: list(subs) + store.aliases(g) for g, subs in subjects.items() if g in store}
    if forms:
        store.set_common(background_facts(forms, background_fact_index(), own=own))


@lru_cache(maxsize=4)
def _standard_center(model, tokenizer, layer: int) -> torch.Tensor:
    return new_store(model, tokenizer, layer, background_questions()).center


def standard_store(model, tokenizer, layer: int, fingerprint: dict | None = None) -> KeyStore:
    """An empty store centred by :func:`background_questions`; the centring forward runs once per
    (backbone, layer) in a process (a fit's training sites and its key export share it)."""
    return KeyStore(layer, fingerprint, center=_standard_center(model, tokenizer, int(layer)).clone())


def store_for_groups(model, tokenizer, groups, *, layer: int, fingerprint: dict | None = None,
                     store: KeyStore | None = None, routing: RoutingSettings | None = None,
                     where: str = "router keys") -> KeyStore:
    """``store`` (or a new one at ``layer``, centred by :func:`background_questions`) with the keys
    of ``groups`` added and the given ``routing`` settings applied
    (:meth:`RoutingSettings.over`: key settings that differ from the store's are refused, naming
    ``where``); where the store's ``common_from`` is set, the groups' background-fact counts too
    (:func:`set_background_facts`).

        store = store_for_groups(model, tok, groups, layer=5, routing=RoutingSettings(threshold=1.0001))
    """
    built = store.routing if store is not None else RoutingSettings(layer=layer)   # a new store takes any
    if store is None:
        store = standard_store(model, tokenizer, layer, fingerprint)
    store.routing = (routing or RoutingSettings()).over(built, where=where, hint="use another cache_dir")
    groups = list(groups)
    for g in groups:
        add_group(model, tokenizer, store, g)
    if store.common_from:
        set_background_facts(store, {g.group_id: g.subjects for g in groups})
    return store


def update_cache_keys(model, tokenizer, cache_dir, groups, *, layer: int, fingerprint: dict,
                      routing: RoutingSettings | None = None) -> KeyStore:
    """Add ``groups``' keys to ``<cache_dir>/router_keys.safetensors`` (created on first use),
    atomically. Call under the cache lock (concurrent writers add their own groups in turn).

        update_cache_keys(model, tok, "edit_cache", groups, layer=5, fingerprint=fp,
                          routing=RoutingSettings(threshold=1.0001))
    """
    from pathlib import Path

    from .keys import KEYS_FILE

    path = Path(cache_dir) / KEYS_FILE
    store = KeyStore.load(path, fingerprint=fingerprint) if path.exists() else None
    store = extend_cache_keys(model, tokenizer, store, groups, layer=layer, fingerprint=fingerprint, where=path,
                              routing=routing)
    store.save(path)
    return store


def extend_cache_keys(model, tokenizer, store: KeyStore | None, groups, *, layer: int, fingerprint: dict, where,
                      routing: RoutingSettings | None = None) -> KeyStore:
    """A cache's router keys ``store`` (None: a new one) with ``groups``' keys added at ``layer``,
    refused if the store was built with other key settings (:meth:`RoutingSettings.over`; the
    layer, ``common_from``); ``routing``: as :func:`store_for_groups`. What
    :func:`update_cache_keys` saves, and what ``write_shard(router_keys=)`` commits with a shard.

        store = extend_cache_keys(model, tok, store, groups, layer=5, fingerprint=fp, where="edit_cache")
    """
    routing = replace(routing or RoutingSettings(), layer=layer)
    return store_for_groups(model, tokenizer, groups, layer=layer, fingerprint=fingerprint, store=store,
                            routing=routing, where=f"router keys {where}")
