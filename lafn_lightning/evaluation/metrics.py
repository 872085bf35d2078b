"""Evaluation metrics of the Bi-ZsRE / MzsRE protocol: teacher-forced predictions, token F1 and EM.

    preds = teacher_forced_predictions(model, tokenizer, prompts, targets)   # [(pred ids, gold ids)]
    f1s, ems = score_predictions(tokenizer, [p for p, _ in preds], [g for _, g in preds])

Scores accumulate in torchmetrics :class:`EditScores` / :class:`ScoreTable` (synced across
devices). The protocol, its sources and our departures from it: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..editing.prompts import join_prompt_target, prompt_target_separator  # noqa: F401  (one rule for training and evaluation)
from torchmetrics import Metric

from ..backbone.inputs import pad_rows
from ..text.spans import answer_token_positions

__all__ = [
    "METRICS",
    "METRIC_TITLES",
    "EditScores",
    "EncodedPair",
    "ScoreTable",
    "encode_prompt_targets",
    "exact_match",
    "greedy_predictions",
    "join_prompt_target",
    "locality_scores",
    "prompt_target_separator",
    "score_predictions",
    "teacher_forced_predictions",
    "token_f1",
]

#: The four metrics of the protocol, in the order of the paper's tables.
METRICS: tuple[str, ...] = ("reliability", "generality", "locality", "portability")
METRIC_TITLES: dict[str, str] = {m: m.capitalize() for m in METRICS}
_METRIC_ALIASES = {"generalization": "generality", "generalisation": "generality"}

ForwardFn = Callable[[Tensor, Tensor], Any]
GenerateFn = Callable[..., Tensor]

# --------------------------------------------------------------------------------------------
# Joining question and answer
# --------------------------------------------------------------------------------------------

class EncodedPair(NamedTuple):
    """One question+answer text tokenized for teacher forcing."""

    input_ids: list[int]
    #: Indices into ``input_ids`` of the answer tokens (always >= 1).
    target_positions: list[int]
    #: Number of leading tokens that form the context of the first answer token.
    context_length: int
    #: The joined text.
    text: str


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the metrics need character "
            "offsets (return_offsets_mapping), which only tokenizers-backed tokenizers provide"
        )


def _as_str_list(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    return list(values)


def encode_prompt_targets(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str]) -> list[EncodedPair]:
    """Tokenize ``join_prompt_target(prompt, target)`` and locate the answer tokens.

    Special tokens are added as the tokenizer does by default (so a BOS is kept when the
    tokenizer adds one). An answer token is a non-special token whose character span overlaps
    the text after the question, ``[len(prompt), len(text))``: this includes a token that
    straddles the boundary (e.g. a trailing space of the question merged into the answer's first
    token, or a byte-level piece shared by the last question character and the first answer
    character), so no answer character is ever left unscored.

    Raises ``ValueError`` when the first answer token would be at position 0 (empty question and
    no BOS): it has no context to be predicted from.
    """
    _check_fast(tokenizer)
    prompts = _as_str_list(prompts, "prompts")
    targets = _as_str_list(targets, "targets")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    texts = [join_prompt_target(p, t) for p, t in zip(prompts, targets)]
    enc = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    out: list[EncodedPair] = []
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        ids = list(enc["input_ids"][i])
        offsets = enc["offset_mapping"][i]
        special = enc["special_tokens_mask"][i]
        positions = answer_token_positions(offsets, special, len(prompt), len(text))
        if positions and positions[0] == 0:
            raise ValueError(
                f"answer token at position 0 for {text!r}: empty question and the tokenizer adds no "
                "BOS, so the first answer token has no context"
            )
        if positions:
            context_length = positions[0]
        else:  # empty answer: the context is everything but trailing special tokens
            context_length = len(ids)
            while context_length > 0 and special[context_length - 1]:
                context_length -= 1
        out.append(EncodedPair(ids, positions, context_length, text))
    return out


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - exotic callables
        return set()


def _model_forward(model: nn.Module) -> ForwardFn:
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in _forward_params(model) else {}

    def run(input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        return _logits_of(model(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs))

    return run


def _resolve_forward(model: Any, forward: ForwardFn | None) -> ForwardFn:
    if forward is not None:
        return lambda ids, mask: _logits_of(forward(ids, mask))
    if model is None:
        raise ValueError("give a model or a forward callable")
    return _model_forward(model)


def _resolve_device(model: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()

    def add(value: Any) -> None:
        if value is None:
            return
        if isinstance(value, int):
            ids.add(value)
        else:
            ids.update(int(v) for v in value)

    add(getattr(tokenizer, "eos_token_id", None))
    config = getattr(model, "generation_config", None)
    add(getattr(config, "eos_token_id", None))
    return ids


def teacher_forced_predictions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced argmax predictions of the answer tokens.

    For each ``(prompt, target)``, the text ``join_prompt_target(prompt, target)`` is tokenized
    (see :func:`encode_prompt_targets`); one forward runs over each batch of ``batch_size`` texts,
    right-padded with an attention mask; for every answer token at position ``t`` the prediction
    is ``argmax(logits[t - 1])``. When the model's forward takes ``logits_to_keep`` (HF causal
    LMs), only the needed positions are projected onto the vocabulary.

    Args:
        model: any Hugging Face causal LM (or module returning logits); put in eval mode for the
            call and restored afterwards. May be ``None`` when ``forward`` is given.
        forward: optional ``callable(input_ids, attention_mask) -> logits`` (or an output with
            ``.logits``) used instead of ``model(...)``; the edited model passes its own.
        device: where the inputs go; default: the model's parameters' device, else CPU.

    Returns:
        one ``(predicted_ids, gold_ids)`` per sample, of equal length.
    """
    encoded = encode_prompt_targets(tokenizer, prompts, targets)
    run = _resolve_forward(model, forward)
    # HF causal LMs can project only the needed positions onto the vocabulary (logits_to_keep):
    # with a 262k vocabulary (Gemma 3) the full logits would dominate time and memory.
    slice_positions = forward is None and "logits_to_keep" in _forward_params(model)
    dev = _resolve_device(model, device)
    pad_id = _pad_id(tokenizer)
    results: list[tuple[list[int], list[int]]] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            input_ids, attention_mask, _ = pad_rows([e.input_ids for e in chunk], pad_id, left=False, device=dev)
            keep = sorted({t - 1 for e in chunk for t in e.target_positions})
            if slice_positions and keep:
                logits = run(input_ids, attention_mask, logits_to_keep=torch.as_tensor(keep, device=dev))
            else:
                logits = run(input_ids, attention_mask)
            if logits.shape[:2] == input_ids.shape:
                column = None  # full logits
            elif slice_positions and logits.shape[:2] == (input_ids.shape[0], len(keep)):
                column = {p: k for k, p in enumerate(keep)}
            else:
                raise ValueError(
                    f"logits of shape {tuple(logits.shape)} do not cover the input {tuple(input_ids.shape)}"
                )
            for row, e in enumerate(chunk):
                if not e.target_positions:
                    results.append(([], []))
                    continue
                prev_pos = [t - 1 for t in e.target_positions]
                if column is not None:
                    prev_pos = [column[p] for p in prev_pos]
                prev = torch.as_tensor(prev_pos, device=logits.device)
                pred = logits[row].index_select(0, prev).argmax(dim=-1).tolist()
                gold = [e.input_ids[t] for t in e.target_positions]
                results.append((pred, gold))
    return results


def _greedy_loop(
    run: ForwardFn,
    contexts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    pad_id: int,
    eos_ids: set[int],
    device: torch.device,
) -> list[list[int]]:
    """Greedy decoding by repeated full forwards over a right-padded buffer (no KV cache).

    Right padding keeps every real token at its unpadded position, so this is exact for any
    causal model that honours the attention mask, whatever its position handling.
    """
    n = len(contexts)
    lengths = [len(c) for c in contexts]
    width = max(lengths) + max(budgets)
    buf = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, ctx in enumerate(contexts):
        buf[i, : len(ctx)] = torch.as_tensor(list(ctx), dtype=torch.long, device=device)
        mask[i, : len(ctx)] = 1
    out: list[list[int]] = [[] for _ in range(n)]
    done = [b <= 0 for b in budgets]
    while not all(done):
        active = [i for i in range(n) if not done[i]]
        cur = max(lengths[i] for i in active)
        rows = torch.as_tensor(active, device=device)
        logits = _logits_of(run(buf[rows, :cur], mask[rows, :cur]))
        for k, i in enumerate(active):
            nxt = int(logits[k, lengths[i] - 1].argmax())
            if nxt in eos_ids:
                done[i] = True
                continue
            out[i].append(nxt)
            buf[i, lengths[i]] = nxt
            mask[i, lengths[i]] = 1
            lengths[i] += 1
            if len(out[i]) >= budgets[i]:
                done[i] = True
    return out


def greedy_predictions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    margin: int = 0,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    forward: ForwardFn | None = None,
    generate: GenerateFn | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Free-generation view: greedy decoding of ``len(gold) + margin`` tokens, cut at EOS.

    The context is the tokenized text up to the first answer token (the same context that
    teacher forcing uses for the first answer token, BOS included); the gold ids are the
    teacher-forced gold ids. Decoding, in order of preference:

    * ``generate``: a callable with the signature of ``model.generate`` used as
      ``generate(input_ids=..., attention_mask=..., max_new_tokens=...)`` on a left-padded
      batch, returning sequences that start with ``input_ids`` (as HF does); it must be greedy.
    * ``forward`` given, or the model has no ``generate``: a manual greedy loop over a
      right-padded buffer calling ``forward(input_ids, attention_mask)`` (or the model) each step.
    * otherwise ``model.generate`` on a left-padded batch with a greedy ``GenerationConfig``.

    Generation stops at the tokenizer's (or the model's generation config's) EOS, which is not
    returned; at most ``len(gold) + margin`` tokens are kept.

    Returns:
        one ``(generated_ids, gold_ids)`` per sample.
    """
    if margin < 0:
        raise ValueError("margin must be >= 0")
    encoded = encode_prompt_targets(tokenizer, prompts, targets)
    dev = _resolve_device(model, device)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(tokenizer, model)
    use_loop = generate is None and (forward is not None or not hasattr(model, "generate"))
    run = _resolve_forward(model, forward) if use_loop else None
    results: list[tuple[list[int], list[int]]] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            contexts = [e.input_ids[: e.context_length] for e in chunk]
            if any(len(c) == 0 for c in contexts):
                raise ValueError("empty generation context (empty prompt and no BOS)")
            golds = [[e.input_ids[t] for t in e.target_positions] for e in chunk]
            budgets = [len(g) + margin for g in golds]
            if run is not None:
                generated = _greedy_loop(run, contexts, budgets, pad_id, eos_ids, dev)
            else:
                generated = _generate_left_padded(model, generate, contexts, max(budgets), pad_id, eos_ids, dev)
            for gen, gold, budget in zip(generated, golds, budgets):
                cut: list[int] = []
                for tok in gen:
                    if tok in eos_ids or len(cut) >= budget:
                        break
                    cut.append(tok)
                results.append((cut, gold))
    return results


def _generate_left_padded(
    model: Any,
    generate: GenerateFn | None,
    contexts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: set[int],
    device: torch.device,
) -> list[list[int]]:
    input_ids, attention_mask, _ = pad_rows(contexts, pad_id, left=True, device=device)
    if max_new_tokens <= 0:
        return [[] for _ in contexts]
    if generate is not None:
        seqs = generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens)
    else:
        from transformers import GenerationConfig

        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos_ids) or None,
        )
        seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    seqs = getattr(seqs, "sequences", seqs)
    return [row.tolist() for row in seqs[:, input_ids.shape[1] :]]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _id_list(ids: Iterable[int] | Tensor) -> list[int]:
    if isinstance(ids, Tensor):
        return [int(v) for v in ids.reshape(-1).tolist()]
    return [int(v) for v in ids]


def token_f1(pred_ids: Iterable[int] | Tensor, gold_ids: Iterable[int] | Tensor, *, variant: str = "f1") -> float:
    """Token-level F1 over the multiset overlap of token ids, in [0, 1].

    ``overlap = sum over ids of min(count in pred, count in gold)``; precision =
    overlap / |pred|, recall = overlap / |gold|, F1 = 2PR/(P+R) = 2·overlap/(|pred|+|gold|).
    Both empty: 1.0; exactly one empty: 0.0; never divides by zero.

    ``variant="pr_product"`` returns P·R, the formula of the original Bi-ZsRE script (copied by
    ReMaKE), for comparison with numbers published with it.
    """
    if variant not in ("f1", "pr_product"):
        raise ValueError(f"unknown variant {variant!r}: 'f1' or 'pr_product'")
    pred, gold = _id_list(pred_ids), _id_list(gold_ids)
    if not pred and not gold:
        return 1.0
    if not pred or not gold:
        return 0.0
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if variant == "pr_product":
        return overlap * overlap / (len(pred) * len(gold))
    return 2.0 * overlap / (len(pred) + len(gold))


def exact_match(pred_text: str, gold_text: str) -> float:
    """1.0 when the two strings are equal after ``strip()``, else 0.0."""
    return 1.0 if pred_text.strip() == gold_text.strip() else 0.0


def _drop_special(ids: list[int], special: set[int]) -> list[int]:
    return [i for i in ids if i not in special] if special else ids


def score_predictions(
    tokenizer: Any,
    preds: Sequence[Sequence[int]],
    golds: Sequence[Sequence[int]],
    *,
    skip_special_tokens: bool = True,
    retokenize: bool = False,
    variant: str = "f1",
) -> tuple[list[float], list[float]]:
    """Per-sample ``(f1_values, em_values)`` in [0, 1] for lists of predicted and gold ids.

    With ``skip_special_tokens`` (default) special ids (EOS, pad, ...) are removed before F1 and
    skipped in decoding, as upstream decodes with ``skip_special_tokens=True``. EM compares the
    decoded strings (stripped). ``retokenize=True`` computes F1 on
    ``tokenizer.encode(decoded_text, add_special_tokens=False)`` instead of on the ids, which is
    what the Bi-ZsRE / ReMaKE scripts do.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} references")
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if skip_special_tokens else set()
    f1s: list[float] = []
    ems: list[float] = []
    for pred, gold in zip(preds, golds):
        p = _drop_special(_id_list(pred), special)
        g = _drop_special(_id_list(gold), special)
        p_text = tokenizer.decode(p, skip_special_tokens=skip_special_tokens)
        g_text = tokenizer.decode(g, skip_special_tokens=skip_special_tokens)
        if retokenize:
            p = tokenizer.encode(p_text, add_special_tokens=False)
            g = tokenizer.encode(g_text, add_special_tokens=False)
        f1s.append(token_f1(p, g, variant=variant))
        ems.append(exact_match(p_text, g_text))
    return f1s, ems


def locality_scores(
    pred_edited_ids: Sequence[int],
    pred_unedited_ids: Sequence[int],
    tokenizer: Any = None,
    *,
    variant: str = "f1",
) -> tuple[float, float]:
    """Locality of one probe: ``(f1, em)`` in [0, 1] of the edited model's prediction against
    the unedited model's prediction.

    Both are teacher-forced predictions on the same locality question and recorded answer
    (:func:`teacher_forced_predictions` run once with the edited and once with the unedited
    model), so the unedited prediction plays the gold. F1 is the multiset overlap of the ids
    (special ids dropped when a tokenizer is given); "EM" compares the decoded strings (stripped)
    when a tokenizer is given, else the id sequences. For lists of probes use
    ``score_predictions(tokenizer, edited_preds, unedited_preds)``.
    """
    edited, unedited = _id_list(pred_edited_ids), _id_list(pred_unedited_ids)
    if tokenizer is None:
        return token_f1(edited, unedited, variant=variant), float(edited == unedited)
    f1s, ems = score_predictions(tokenizer, [edited], [unedited], variant=variant)
    return f1s[0], ems[0]


def _value_tensor(values: Any, name: str) -> Tensor:
    try:
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} values must be numbers (ids need pred_texts and gold_texts)") from err
    if t.dim() > 1:
        raise ValueError(f"{name} values must be a scalar or 1-D (ids need pred_texts and gold_texts)")
    t = t.reshape(-1).cpu()
    if t.numel() and (torch.isnan(t).any() or t.min() < 0.0 or t.max() > 1.0):
        raise ValueError(f"{name} values must be fractions in [0, 1] (got {t.tolist()[:5]}...)")
    return t


class EditScores(Metric):
    """F1 and EM of one (metric, language) cell, accumulated as sums and counts.

    ``update`` takes either

    * ``update(pred_ids_list, gold_ids_list, pred_texts, gold_texts)``: F1 is
      :func:`token_f1` of each pair of id lists, EM is :func:`exact_match` of each pair of texts
      (decode them with the tokenizer, special tokens skipped); or
    * ``update(f1_values, em_values)``: per-sample values already in [0, 1] (e.g. from
      :func:`score_predictions` or :func:`locality_scores`); a float or a sequence/tensor.

    ``variant="pr_product"`` makes the id path use the old Bi-ZsRE/ReMaKE formula (see
    :func:`token_f1`). ``compute()`` returns ``{"f1": 100 * mean F1, "em": 100 * mean EM}`` as float64 scalar
    tensors. The states are ``f1_sum``, ``em_sum`` (float64) and ``count`` (int64), all reduced
    with ``"sum"``, so the DDP-synced value is exactly the value over all samples. With no samples
    ``compute()`` returns NaN for both (torchmetrics warns that compute ran before update; no
    exception). float64 states do not run on MPS.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    f1_sum: Tensor
    em_sum: Tensor
    count: Tensor

    def __init__(self, *, variant: str = "f1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        token_f1([], [], variant=variant)  # validates the name
        self.variant = variant
        self.add_state("f1_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("em_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        preds: Any,
        target: Any,
        pred_texts: Sequence[str] | None = None,
        gold_texts: Sequence[str] | None = None,
    ) -> None:
        if (pred_texts is None) != (gold_texts is None):
            raise ValueError("give both pred_texts and gold_texts, or neither")
        if pred_texts is None:
            f1 = _value_tensor(preds, "f1")
            em = _value_tensor(target, "em")
        else:
            assert gold_texts is not None
            n = len(preds)
            if not (len(target) == len(pred_texts) == len(gold_texts) == n):
                raise ValueError(
                    f"lengths differ: {n} predictions, {len(target)} references, "
                    f"{len(pred_texts)} predicted texts, {len(gold_texts)} reference texts"
                )
            f1 = torch.tensor(
                [token_f1(p, g, variant=self.variant) for p, g in zip(preds, target)], dtype=torch.float64
            )
            em = torch.tensor([exact_match(p, g) for p, g in zip(pred_texts, gold_texts)], dtype=torch.float64)
        if f1.numel() != em.numel():
            raise ValueError(f"{f1.numel()} F1 values but {em.numel()} EM values")
        self.f1_sum += f1.sum().to(self.f1_sum.device)
        self.em_sum += em.sum().to(self.em_sum.device)
        self.count += f1.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.to(torch.float64)  # 0 -> 0/0 = nan, no exception
        return {"f1": 100.0 * self.f1_sum / n, "em": 100.0 * self.em_sum / n}


# --------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------


def _canonical_metric(name: str) -> str:
    key = name.strip().lower()
    return _METRIC_ALIASES.get(key, key)


class ScoreTable(nn.Module):
    """One :class:`EditScores` per (setting, metric, language), plus the paper's table.

    Args:
        languages: the language columns, in display order (e.g. ``["en", "zh"]``).
        metrics: the rows; default :data:`METRICS`.
        settings: independent tables kept side by side (e.g. ``("teacher_forced", "greedy")``,
            or one per edit language); every method takes ``setting=None`` meaning the first.

    All cells exist from construction (nothing is created lazily), so every DDP rank holds the
    same metrics in the same order and ``compute()`` — a collective when a process group is
    initialised — can be called on every rank. Being an ``nn.Module``, the table moves with the
    LightningModule it is attached to.

    ``compute()`` returns ``{metric: {language: {"f1": x, "em": y}}}`` (floats, 0-100) with an extra
    ``"avg"`` language: the macro-average over the languages that have samples (NaN if none).
    """

    AVG = "avg"

    def __init__(
        self,
        languages: Sequence[str],
        metrics: Sequence[str] = METRICS,
        settings: Sequence[str] = ("teacher_forced",),
    ) -> None:
        super().__init__()
        self.languages = tuple(_as_str_list(languages, "languages"))
        self.metrics = tuple(_canonical_metric(m) for m in _as_str_list(metrics, "metrics"))
        self.settings = tuple(_as_str_list(settings, "settings"))
        for label, items in (("languages", self.languages), ("metrics", self.metrics), ("settings", self.settings)):
            if not items:
                raise ValueError(f"no {label}")
            if len(set(items)) != len(items):
                raise ValueError(f"duplicate {label}: {items}")
        if self.AVG in self.languages:
            raise ValueError(f"{self.AVG!r} is reserved for the macro-average column")
        self._index: dict[tuple[str, str, str], int] = {}
        cells: list[EditScores] = []
        for s in self.settings:
            for m in self.metrics:
                for lang in self.languages:
                    self._index[(s, m, lang)] = len(cells)
                    cells.append(EditScores())
        self.cells = nn.ModuleList(cells)

    def _setting(self, setting: str | None) -> str:
        if setting is None:
            return self.settings[0]
        if setting not in self.settings:
            raise KeyError(f"unknown setting {setting!r}; known: {self.settings}")
        return setting

    def scores(self, metric: str, language: str, setting: str | None = None) -> EditScores:
        """The :class:`EditScores` of one cell."""
        key = (self._setting(setting), _canonical_metric(metric), language)
        if key[1] not in self.metrics:
            raise KeyError(f"unknown metric {metric!r}; known: {self.metrics}")
        if language not in self.languages:
            raise KeyError(f"unknown language {language!r}; known: {self.languages}")
        return self.cells[self._index[key]]  # type: ignore[return-value]

    def update(self, metric: str, language: str, *args: Any, setting: str | None = None, **kwargs: Any) -> None:
        """``EditScores.update`` of one cell (same arguments)."""
        self.scores(metric, language, setting).update(*args, **kwargs)

    def add_predictions(
        self,
        metric: str,
        language: str,
        tokenizer: Any,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        setting: str | None = None,
        **score_kwargs: Any,
    ) -> None:
        """Score ``(predicted_ids, reference_ids)`` pairs with :func:`score_predictions` and add them.

        For Locality pass ``zip(edited_predictions, unedited_predictions)``.
        """
        pairs = list(pairs)
        if not pairs:
            return
        f1s, ems = score_predictions(tokenizer, [p for p, _ in pairs], [g for _, g in pairs], **score_kwargs)
        self.update(metric, language, f1s, ems, setting=setting)

    def reset(self) -> None:
        for cell in self.cells:
            cell.reset()  # type: ignore[operator]

    def compute(self, setting: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
        s = self._setting(setting)
        table: dict[str, dict[str, dict[str, float]]] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            for m in self.metrics:
                row: dict[str, dict[str, float]] = {}
                for lang in self.languages:
                    value = self.cells[self._index[(s, m, lang)]].compute()
                    row[lang] = {"f1": float(value["f1"]), "em": float(value["em"])}
                row[self.AVG] = {k: _nanmean([row[lang][k] for lang in self.languages]) for k in ("f1", "em")}
                table[m] = row
        return table

    def compute_all(self) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """``{setting: compute(setting)}`` for every setting."""
        return {s: self.compute(s) for s in self.settings}

    def flat(self, setting: str | None = None, *, results: Mapping[str, Any] | None = None, sep: str = "/") -> dict[str, float]:
        """``{"reliability/en/f1": x, ...}`` (for ``LightningModule.log_dict``)."""
        results = self.compute(setting) if results is None else results
        return {
            sep.join((m, lang, k)): v
            for m, row in results.items()
            for lang, cell in row.items()
            for k, v in cell.items()
        }

    def to_markdown(
        self,
        title: str = "",
        setting: str | None = None,
        *,
        results: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
        digits: int = 1,
    ) -> str:
        """The paper's layout: rows = metrics, columns = languages + Avg, cells ``"F1 / EM"``.

        ``results`` (a :meth:`compute` output) avoids a second, collective compute; a cell without
        samples prints ``n/a``.
        """
        results = self.compute(setting) if results is None else results
        languages = [lang for lang in next(iter(results.values())) if lang != self.AVG] if results else []
        header = ["Metric", *languages, "Avg"]
        lines = []
        if title:
            lines += [f"### {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([" --- "] + [" :---: "] * (len(header) - 1)) + "|")
        for metric, row in results.items():
            name = METRIC_TITLES.get(metric, metric)
            cells = [_format_cell(row[lang], digits) for lang in [*languages, self.AVG]]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        return "\n".join(lines) + "\n"


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _format_cell(cell: Mapping[str, float], digits: int) -> str:
    f1, em = float(cell["f1"]), float(cell["em"])
    if math.isnan(f1) or math.isnan(em):
        return "n/a"
    return f"{f1:.{digits}f} / {em:.{digits}f}"
