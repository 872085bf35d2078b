"""Edit texts as model inputs: question/answer joining, subject position, answer tokens, prefixes, anchors.

    enc = encode_edit_text(tokenizer, prefix, question, answer, own_subject, group.subjects)
    enc.subject_pos, enc.target_positions      # where ΔV attaches; the answer's tokens

Everything that decides *which token* an edit uses lives here (and in :mod:`..text.spans`), so
training, locating, evaluation and inference agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..text.scripts import joins_without_space
from ..text.spans import answer_token_positions, last_token_of_span
from ..text.subjects import ANCHOR_TEMPLATES, RULES, anchor_text, subject_span  # noqa: F401  (re-exported)

#: A word in each language that starts a sampled prefix, so prefixes are in the edit's language.
PREFIX_SEEDS = {
    "en": "The", "cz": "To", "de": "Die", "du": "De", "es": "El", "fr": "Le", "pt": "O",
    "ru": "Это", "th": "ใน", "tr": "Bu", "vi": "Các", "zh": "这",
}

def prompt_target_separator(prompt: str, target: str) -> str:
    """The text put between a question and its answer: ``" "`` or ``""``.

    One space joins two space-delimited scripts. No separator when the question is empty or ends
    with whitespace, when the answer is empty or starts with whitespace, or when either side of
    the join is a character of a script written without spaces (CJK ideographs and punctuation,
    kana, full-width forms such as ``？``, Thai, Lao, Khmer, Myanmar).
    """
    if not prompt or not target:
        return ""
    if prompt[-1].isspace() or target[0].isspace():
        return ""
    if joins_without_space(target[0]) or joins_without_space(prompt[-1]):
        return ""
    return " "


def join_prompt_target(prompt: str, target: str) -> str:
    """``prompt + separator + target`` (see :func:`prompt_target_separator`).

    The answer always occupies the last ``len(target)`` characters of the result; training and
    evaluation both build their texts with this function.
    """
    return prompt + prompt_target_separator(prompt, target) + target


@dataclass
class Encoded:
    """One tokenised text with the positions the edit module needs."""

    input_ids: list[int]
    subject_pos: int
    target_positions: list[int]      # tokens of the answer (empty for KL anchors)
    rule: str


def encode_edit_text(tokenizer, prefix: str, question: str, target: str | None, own_subject: str, group_subjects,
                     span: tuple[int, int, str] | None = None) -> Encoded:
    """Tokenise ``prefix + question (+ answer)``, locating the subject's last token and the answer tokens.
    ``span``: the subject's ``(start, end, rule)`` in ``question`` when already known (default:
    :func:`subject_span`; the router's site: ``routing.build.routed_subject_span``)."""
    head = (prefix.rstrip() + " ") if prefix else ""
    s0, s1, rule = span if span is not None else subject_span(question, own_subject, group_subjects)
    if target is None:
        text, t0 = head + question, None
    else:
        text = head + join_prompt_target(question, target)
        t0 = len(head) + len(question)  # the answer's tokens start after the question (separator included)
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = enc["offset_mapping"]
    pos = last_token_of_span(offsets, len(head) + s0, len(head) + s1)
    if pos is None:
        raise ValueError(f"could not map the subject span of {question!r} to a token")
    targets = answer_token_positions(offsets, enc["special_tokens_mask"], t0, len(text)) if t0 is not None else []
    if target is not None and not targets:
        raise ValueError(f"answer {target!r} produced no token after {question!r}")
    if targets and pos >= targets[0]:
        raise ValueError(f"subject token falls inside the answer in {text!r}")
    return Encoded(list(enc["input_ids"]), pos, targets, rule)


@torch.no_grad()
def sample_prefixes(model, tokenizer, language: str, count: int, length: int, *, seed: int = 0) -> list[str]:
    """``count`` short texts of ``length`` tokens sampled from the model itself as a continuation
    of a common word of ``language`` (the word steers the language and is not kept; paper: M = 4
    prefixes of length 5). Deterministic given ``seed``."""
    if count <= 0:
        return []
    seed_text = PREFIX_SEEDS.get(language, "The")
    ids = tokenizer(seed_text, return_tensors="pt")["input_ids"].to(model.device)
    n_seed = ids.shape[1]
    ids = ids.repeat(count, 1)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000003 + sum(map(ord, language)))
    special = set(tokenizer.all_special_ids)
    for _ in range(length):
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1, :].float()
        if special:
            logits[:, sorted(i for i in special if i < logits.shape[-1])] = float("-inf")
        probs = torch.softmax(logits, dim=-1).cpu()
        top = torch.topk(probs, k=min(50, probs.shape[-1]), dim=-1)
        choice = torch.multinomial(top.values, 1, generator=gen)
        nxt = top.indices.gather(1, choice).to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    texts = tokenizer.batch_decode(ids[:, n_seed:], skip_special_tokens=True)
    out = []
    for text in texts:
        text = " ".join(text.split())
        out.append(text if text else seed_text)
    return out
