"""Token <-> character spans: where a character span of a text lies in its tokens, both ways.

    text, spans = token_spans(tokenizer, ids)            # each token's (start, end) in text
    last_token_of_span(spans, start, end)                # the token an edit attaches to
    answer_token_positions(offsets, special, start, end) # the answer's tokens (training = scoring)
"""
from __future__ import annotations


def last_token_of_span(offsets, start: int, end: int) -> int | None:
    """Index of the last (non-empty) token overlapping the character span [start, end), or None."""
    found = None
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            found = i
    return found


def answer_token_positions(offsets, special, start: int, end: int) -> list[int]:
    """The one answer-token rule, used by training (L_target) and evaluation (scoring) alike.

    The answer's tokens are the non-special, non-empty tokens overlapping ``[start, end)``, where
    ``start`` is the end of the question (so the separator between question and answer counts):
    a token that is only the separator (Gemma's and Llama's lone "▁" before digits) belongs to the
    answer, as in the Bi-ZsRE/EasyEdit protocol, and is both trained and scored. ``special``: one
    flag per token (or None).
    """
    flags = special if special is not None else [0] * len(offsets)
    return [i for i, ((a, b), sp) in enumerate(zip(offsets, flags)) if not sp and b > a and a < end and b > start]


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
