"""Tests of lafn_lightning.metrics: scores, teacher forcing, greedy view, aggregation, DDP sync."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lafn_lightning.evaluation.metrics import (
    METRICS,
    EditScores,
    ScoreTable,
    encode_prompt_targets,
    exact_match,
    greedy_predictions,
    join_prompt_target,
    locality_scores,
    prompt_target_separator,
    score_predictions,
    teacher_forced_predictions,
    token_f1,
)

# ------------------------------------------------------------------------------------------
# Tokenizers built in the test
# ------------------------------------------------------------------------------------------

WORDS = (
    "The capital of France is Paris London . ? New York City Who the president "
    "首 都 是 北 京 海 上 中 国 巴 黎"
).split()


@functools.lru_cache(maxsize=None)
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level vocabulary; CJK characters are single tokens; a BOS is prepended (like Llama)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@functools.lru_cache(maxsize=None)
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 / Qwen style): no BOS, leading spaces inside tokens, CJK split into bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The capital of France is Paris.",
        "The capital of Japan is Tokyo.",
        "法国的首都是巴黎。",
        "日本的首都是东京。",
        "Q: What is the capital of France? A: Paris",
    ] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def wid(word: str) -> int:
    return word_tokenizer().convert_tokens_to_ids(word)


# ------------------------------------------------------------------------------------------
# Models whose outputs the test controls
# ------------------------------------------------------------------------------------------

SENTINEL = "?"  # what every position predicts unless the table says otherwise; pads predict "<unk>"


class TableLM(nn.Module):
    """logits[b, t] is one-hot on ``next_of[input_ids[b, t]]``: the argmax at each position is known.

    Pad positions (attention 0) predict ``<unk>``, so reading one would show in the results. Every
    call is recorded (inputs, mask, training flag).
    """

    def __init__(self, next_of: dict[int, int], vocab_size: int, default: int) -> None:
        super().__init__()
        self.next_of = next_of
        self.vocab_size = vocab_size
        self.default = default
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        self.calls.append((input_ids.clone(), attention_mask.clone(), self.training))
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab_size)
        for i in range(b):
            for t in range(n):
                if attention_mask[i, t] == 0:
                    nxt = wid("<unk>")
                else:
                    nxt = self.next_of.get(int(input_ids[i, t]), self.default)
                logits[i, t, nxt] = 10.0
        return SimpleNamespace(logits=logits)


def table_lm() -> TableLM:
    chain = {
        "The": "capital", "capital": "of", "of": "France", "France": "is", "is": "London",
        "London": ".", ".": "</s>",
        "首": "都", "都": "是", "是": "北", "北": "海",
        "New": "York", "York": "City", "City": "New",
    }
    next_of = {wid(a): wid(b) for a, b in chain.items()}
    return TableLM(next_of, len(word_tokenizer()), default=wid(SENTINEL))


class OracleLM(nn.Module):
    """Predicts the *actual* next input token at every position (sees the future on purpose):
    teacher-forced predictions then equal the gold exactly iff positions are aligned right."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, **_):
        b, n = input_ids.shape
        nxt = torch.zeros_like(input_ids)
        nxt[:, :-1] = input_ids[:, 1:]
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float()


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------
# token_f1 / exact_match
# ------------------------------------------------------------------------------------------


def test_token_f1_known_values():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 3)  # P = R = 2/3
    assert token_f1([1], [1, 2, 3, 4]) == pytest.approx(2 * 1 * 0.25 / 1.25)  # P=1, R=1/4 -> 0.4
    assert token_f1([7, 8], [9]) == 0.0  # no overlap: 0, not a division by zero
    assert token_f1([3, 2, 1], [1, 2, 3]) == 1.0  # order does not matter
    assert token_f1(torch.tensor([1, 2]), torch.tensor([2])) == pytest.approx(2 / 3)
    # the P*R formula of the original Bi-ZsRE / ReMaKE scripts
    assert token_f1([1, 2, 3], [2, 3, 4], variant="pr_product") == pytest.approx(4 / 9)
    assert token_f1([1], [1, 2, 3, 4], variant="pr_product") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        token_f1([1], [1], variant="macro")


def test_token_f1_empty_cases():
    assert token_f1([], []) == 1.0
    assert token_f1([], [1, 2]) == 0.0
    assert token_f1([1, 2], []) == 0.0
    assert token_f1([], [], variant="pr_product") == 1.0
    assert token_f1([], [5], variant="pr_product") == 0.0


def test_token_f1_is_a_multiset_overlap():
    assert token_f1([5, 5, 5], [5]) == pytest.approx(0.5)  # overlap 1: P=1/3, R=1
    assert token_f1([5], [5, 5, 5]) == pytest.approx(0.5)
    assert token_f1([5, 5], [5, 5, 6]) == pytest.approx(0.8)  # overlap 2: 2*2/(2+3)
    assert token_f1([5, 6, 5], [6, 5, 5]) == 1.0
    assert token_f1([5, 5, 6, 6], [5, 6, 7, 8]) == pytest.approx(0.5)  # overlap 2 of 4 and 4


def test_exact_match():
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match(" Paris \n", "Paris") == 1.0
    assert exact_match("Paris", "paris") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("  ", "") == 1.0
    assert exact_match("", "Paris") == 0.0
    assert exact_match("北京", "北京") == 1.0


# ------------------------------------------------------------------------------------------
# Joining prompt and target
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "target", "sep"),
    [
        ("The capital of France is", "Paris", " "),
        ("Was ist die Hauptstadt?", "Berlin", " "),
        ("Столица Франции —", "Париж", " "),
        ("법국의 수도는", "파리", " "),  # Hangul is written with spaces
        ("法国的首都是", "巴黎", ""),
        ("フランスの首都は", "パリ", ""),
        ("เมืองหลวงของฝรั่งเศสคือ", "ปารีส", ""),
        ("中国的首都是", "Beijing", ""),  # the question ends in an unspaced script
        ("哪家公司制造了沃尔沃B12M?", "Volkswagen", " "),  # both sides space-delimited
        ("IAAF综合项目挑战赛的创立时间是什么时候？", "2006年", ""),  # full-width question mark
        ("Ramalinaceae อยู่ในวงศ์ใด", "Lamiinae", ""),
        ("Q: capital of France? A: ", "Paris", ""),  # prompt ends with whitespace
        ("Q:", " Paris", ""),  # target starts with whitespace
        ("", "Paris", ""),
        ("The capital is", "", ""),
    ],
)
def test_separator(prompt, target, sep):
    assert prompt_target_separator(prompt, target) == sep
    joined = join_prompt_target(prompt, target)
    assert joined == prompt + sep + target
    assert joined.endswith(target)


# ------------------------------------------------------------------------------------------
# Locating the target tokens with offsets
# ------------------------------------------------------------------------------------------


def test_offsets_pick_exactly_the_target_tokens_wordlevel():
    tok = word_tokenizer()
    prompts = ["The capital of France is", "首都是", "The capital of France is", ""]
    targets = ["Paris", "北京", "New York City", "Paris"]
    enc = encode_prompt_targets(tok, prompts, targets)
    # BOS kept at position 0, target tokens are exactly the trailing ones
    assert enc[0].input_ids == [1] + [wid(w) for w in "The capital of France is Paris".split()]
    assert enc[0].target_positions == [6]
    assert enc[0].context_length == 6
    assert enc[1].text == "首都是北京"  # no space before a Chinese answer
    assert enc[1].input_ids == [1, wid("首"), wid("都"), wid("是"), wid("北"), wid("京")]
    assert enc[1].target_positions == [4, 5]
    assert [enc[2].input_ids[t] for t in enc[2].target_positions] == [wid("New"), wid("York"), wid("City")]
    # empty prompt: BOS is the context of the first answer token
    assert enc[3].input_ids == [1, wid("Paris")] and enc[3].target_positions == [1]


def test_offsets_byte_level_bpe_incl_chinese_and_straddling_space():
    tok = bpe_tokenizer()
    cases = [
        ("The capital of France is", "Paris"),
        ("法国的首都是", "巴黎"),
        ("Q: What is the capital of France? A: ", "Paris"),  # trailing space merges into " Paris"
        ("The capital of Japan is", "Tokyo"),
    ]
    enc = encode_prompt_targets(tok, [p for p, _ in cases], [t for _, t in cases])
    for (prompt, target), e in zip(cases, enc):
        full = tok.decode(e.input_ids)
        assert full == join_prompt_target(prompt, target)
        pos = e.target_positions
        assert pos == list(range(pos[0], len(e.input_ids)))  # the trailing run of tokens
        gold_text = tok.decode([e.input_ids[t] for t in pos])
        context_text = tok.decode(e.input_ids[: pos[0]])
        assert context_text + gold_text == full
        assert gold_text.strip() == target  # all of the target, nothing of the question
        assert prompt.startswith(context_text)
    assert tok.decode([enc[0].input_ids[t] for t in enc[0].target_positions]) == " Paris"
    # the Chinese answer is split into several byte-level pieces; all of them are picked
    assert len(enc[1].target_positions) >= 2
    # no BOS and an empty question: the first answer token has no context
    with pytest.raises(ValueError, match="no context"):
        encode_prompt_targets(tok, [""], ["Paris"])


def test_needs_a_fast_tokenizer_and_string_lists():
    with pytest.raises(TypeError, match="fast"):
        encode_prompt_targets(SimpleNamespace(is_fast=False), ["a"], ["b"])
    with pytest.raises(TypeError):
        encode_prompt_targets(word_tokenizer(), "The capital", "Paris")
    with pytest.raises(ValueError):
        encode_prompt_targets(word_tokenizer(), ["a", "b"], ["c"])


# ------------------------------------------------------------------------------------------
# Teacher forcing
# ------------------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "首都是", "The capital of France is", "Who is"]
TARGETS = ["Paris", "北京", "New York City", "the president"]


def test_teacher_forced_predictions_on_a_controlled_model():
    tok, model = word_tokenizer(), table_lm()
    model.train()
    out = teacher_forced_predictions(model, tok, PROMPTS, TARGETS, batch_size=3)
    assert out == [
        ([wid("London")], [wid("Paris")]),  # argmax after "is"
        ([wid("北"), wid("海")], [wid("北"), wid("京")]),  # after "是", then after gold "北"
        ([wid("London"), wid("York"), wid("City")], [wid("New"), wid("York"), wid("City")]),
        ([wid("London"), wid(SENTINEL)], [wid("the"), wid("president")]),
    ]
    # one forward per batch (4 samples, batch 3 -> 2 calls), right padding, eval mode inside
    assert len(model.calls) == 2
    for ids, mask, training in model.calls:
        assert not training
        for row_ids, row_mask in zip(ids, mask):
            n = int(row_mask.sum())
            assert row_mask[:n].eq(1).all() and row_mask[n:].eq(0).all()  # right padding
            assert row_ids[0] == tok.bos_token_id
            assert row_ids[n:].eq(tok.pad_token_id).all()
    assert model.training  # mode restored
    # batching does not change anything
    assert teacher_forced_predictions(model, tok, PROMPTS, TARGETS, batch_size=1) == out


def test_teacher_forced_forward_hook_replaces_the_model():
    tok, model = word_tokenizer(), table_lm()
    expected = teacher_forced_predictions(model, tok, PROMPTS, TARGETS)
    seen = []

    def forward(input_ids, attention_mask):
        seen.append(input_ids.shape)
        return model(input_ids, attention_mask).logits  # a plain tensor is accepted

    assert teacher_forced_predictions(None, tok, PROMPTS, TARGETS, forward=forward) == expected
    assert seen == [torch.Size([4, 9])]  # one batch, longest: BOS + 8 words
    with pytest.raises(ValueError):
        teacher_forced_predictions(None, tok, PROMPTS, TARGETS)


def test_teacher_forced_alignment_with_an_oracle_byte_level_and_chinese():
    tok = bpe_tokenizer()
    prompts = ["法国的首都是", "The capital of France is", "Q: What is the capital of France? A: "]
    targets = ["巴黎", "Paris", "Paris"]
    out = teacher_forced_predictions(OracleLM(len(tok)), tok, prompts, targets, batch_size=2)
    for (pred, gold), target in zip(out, targets):
        assert pred == gold and gold  # shifted by exactly one position
        assert tok.decode(gold).strip() == target
    f1s, ems = score_predictions(tok, [p for p, _ in out], [g for _, g in out])
    assert f1s == [1.0, 1.0, 1.0] and ems == [1.0, 1.0, 1.0]


def test_teacher_forced_on_a_real_tiny_llama_batched_equals_unbatched():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    batched = teacher_forced_predictions(model, tok, PROMPTS, TARGETS, batch_size=4)
    single = [teacher_forced_predictions(model, tok, [p], [t])[0] for p, t in zip(PROMPTS, TARGETS)]
    assert batched == single
    assert [len(p) for p, _ in batched] == [1, 2, 3, 2]
    # the model path projects only the needed positions (logits_to_keep); a forward hook gets full logits
    full = teacher_forced_predictions(
        None, tok, PROMPTS, TARGETS, forward=lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    )
    assert full == batched
    # manual check of one sample: argmax of the full forward at the position before each target token
    e = encode_prompt_targets(tok, [PROMPTS[2]], [TARGETS[2]])[0]
    with torch.no_grad():
        logits = model(torch.tensor([e.input_ids])).logits[0]
    assert batched[2][0] == [int(logits[t - 1].argmax()) for t in e.target_positions]


# ------------------------------------------------------------------------------------------
# Greedy (free generation) view
# ------------------------------------------------------------------------------------------


def test_greedy_manual_loop_cuts_at_eos_and_budget():
    tok, model = word_tokenizer(), table_lm()
    prompts = ["The capital of France is", "The capital of France", "首都是"]
    targets = ["Paris", "New York City", "北京"]
    out = greedy_predictions(model, tok, prompts, targets, margin=5)  # TableLM has no .generate
    # "is" -> London -> "." -> </s> (EOS, not returned)
    assert out[0] == ([wid("London"), wid(".")], [wid("Paris")])
    # "France" -> is -> London -> . -> EOS
    assert out[1] == ([wid("is"), wid("London"), wid(".")], [wid("New"), wid("York"), wid("City")])
    # "是" -> 北 -> 海 -> ? -> ? ...: no EOS, cut at len(gold) + margin = 7 tokens
    assert out[2][0] == [wid("北"), wid("海")] + [wid(SENTINEL)] * 5
    out0 = greedy_predictions(model, tok, prompts, targets, margin=0)
    assert [len(g) for g, _ in out0] == [1, 3, 2]
    assert out0[1][0] == [wid("is"), wid("London"), wid(".")]
    # the manual loop pads on the right: masks are 1s then 0s
    for _, mask, _ in model.calls:
        for row in mask:
            n = int(row.sum())
            assert row[:n].eq(1).all() and row[n:].eq(0).all()


def test_greedy_generate_hook_left_padding():
    tok = word_tokenizer()
    calls = []
    tail = [wid("London"), wid("."), tok.eos_token_id, wid("City"), wid("City")]

    def generate(input_ids, attention_mask, max_new_tokens):
        calls.append((input_ids.clone(), attention_mask.clone(), max_new_tokens))
        new = torch.tensor([tail + [wid("New")] * (max_new_tokens - len(tail))] * input_ids.shape[0])
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)

    prompts, targets = ["The capital of France is", "首都是"], ["Paris", "北京"]
    out = greedy_predictions(None, tok, prompts, targets, margin=5, generate=generate)
    assert out == [([wid("London"), wid(".")], [wid("Paris")]), ([wid("London"), wid(".")], [wid("北"), wid("京")])]
    ids, mask, max_new = calls[0]
    assert max_new == 2 + 5
    for row_ids, row_mask in zip(ids, mask):
        n = int(row_mask.sum())
        assert row_mask[-n:].eq(1).all() and row_mask[:-n].eq(0).all()  # left padding
        assert row_ids[-n] == tok.bos_token_id
    # budget cut when there is no EOS
    out1 = greedy_predictions(None, tok, prompts[:1], targets[:1], margin=0,
                              generate=lambda input_ids, attention_mask, max_new_tokens: torch.cat(
                                  [input_ids, torch.full((1, max_new_tokens), wid("City"))], 1))
    assert out1 == [([wid("City")], [wid("Paris")])]


def test_greedy_model_generate_matches_manual_loop_and_teacher_forcing():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    via_generate = greedy_predictions(model, tok, PROMPTS, TARGETS, margin=3, batch_size=4)
    via_loop = greedy_predictions(
        model, tok, PROMPTS, TARGETS, margin=3,
        forward=lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits,
    )
    single = [greedy_predictions(model, tok, [p], [t], margin=3)[0] for p, t in zip(PROMPTS, TARGETS)]
    assert via_generate == via_loop == single
    tf = teacher_forced_predictions(model, tok, PROMPTS, TARGETS)
    for (gen, gold), (pred, gold_tf) in zip(via_generate, tf):
        assert gold == gold_tf
        assert len(gen) <= len(gold) + 3
        assert tok.eos_token_id not in gen
        if pred[0] != tok.eos_token_id:  # same context -> same first token
            assert gen[0] == pred[0]


# ------------------------------------------------------------------------------------------
# Scoring predictions, locality
# ------------------------------------------------------------------------------------------


def test_score_predictions_drops_special_tokens_and_decodes():
    tok = word_tokenizer()
    preds = [[wid("北"), tok.eos_token_id], [wid("New"), wid("York")], [], [wid("London")]]
    golds = [[wid("北"), wid("京")], [wid("New"), wid("York")], [], [wid("Paris")]]
    f1s, ems = score_predictions(tok, preds, golds)
    assert f1s == [pytest.approx(2 / 3), 1.0, 1.0, 0.0]  # EOS dropped: [北] vs [北, 京]
    assert ems == [0.0, 1.0, 1.0, 0.0]
    f1_keep, _ = score_predictions(tok, preds[:1], golds[:1], skip_special_tokens=False)
    assert f1_keep == [pytest.approx(0.5)]  # EOS counted: overlap 1 of 2 and 2
    f1_rt, em_rt = score_predictions(tok, preds, golds, retokenize=True)
    assert f1_rt == f1s and em_rt == ems
    with pytest.raises(ValueError):
        score_predictions(tok, preds, golds[:2])


def test_locality_scores_compare_edited_with_unedited_predictions():
    tok = word_tokenizer()
    same = [wid("London"), wid(".")]
    assert locality_scores(same, list(same), tok) == (1.0, 1.0)
    assert locality_scores(same, list(same)) == (1.0, 1.0)  # without tokenizer: ids compared
    f1, em = locality_scores([wid("London"), wid("City")], same, tok)
    assert f1 == pytest.approx(0.5) and em == 0.0
    f1, em = locality_scores([wid(".")], same, tok)
    assert f1 == pytest.approx(2 / 3) and em == 0.0
    assert locality_scores([], [], tok) == (1.0, 1.0)
    assert locality_scores([], same, tok) == (0.0, 0.0)
    # the gold answer plays no role: only the two models' predictions are compared
    unedited_model = table_lm()
    edited_model = table_lm()
    edited_model.next_of = {**edited_model.next_of, wid("is"): wid("City")}   # the "edit"
    edited = teacher_forced_predictions(edited_model, tok, ["Who is"], ["the president"])
    unedited = teacher_forced_predictions(unedited_model, tok, ["Who is"], ["the president"])
    assert edited[0][0] != unedited[0][0]
    f1, em = locality_scores(edited[0][0], unedited[0][0], tok)
    expected_f1, _ = score_predictions(tok, [edited[0][0]], [unedited[0][0]])
    assert (f1, em) == (expected_f1[0], 0.0) and f1 < 1.0
    assert locality_scores(unedited[0][0], unedited[0][0], tok) == (1.0, 1.0)
    assert unedited[0][0] != unedited[0][1]            # ... though it differs from the gold answer


# ------------------------------------------------------------------------------------------
# EditScores
# ------------------------------------------------------------------------------------------


def test_edit_scores_from_ids_and_texts():
    m = EditScores()
    m.update([[1, 2, 3], [5, 5, 5], []], [[2, 3, 4], [5], []], ["a b", "x", ""], ["a b ", "y", ""])
    out = m.compute()
    assert set(out) == {"f1", "em"}
    assert float(out["f1"]) == pytest.approx(100 * (2 / 3 + 0.5 + 1.0) / 3)
    assert float(out["em"]) == pytest.approx(100 * 2 / 3)
    assert int(m.count) == 3
    legacy = EditScores(variant="pr_product")
    legacy.update([[1, 2, 3], [1]], [[2, 3, 4], [1, 2, 3, 4]], ["", ""], ["", ""])
    assert float(legacy.compute()["f1"]) == pytest.approx(100 * (4 / 9 + 1 / 4) / 2)


def test_edit_scores_from_values_accumulates_and_resets():
    m = EditScores()
    m.update([1.0, 0.5], [1.0, 0.0])
    m.update(0.25, 1.0)  # a single sample
    m.update(torch.tensor([0.0]), torch.tensor([0.0]))
    out = m.compute()
    assert float(out["f1"]) == pytest.approx(100 * 1.75 / 4)
    assert float(out["em"]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        m.update([95.0], [100.0])  # percentages are refused
    with pytest.raises(ValueError):
        m.update([1.0, 1.0], [1.0])
    with pytest.raises(ValueError):
        m.update([[1]], [[1]], ["a"], None)
    with pytest.raises(ValueError):
        m.update([[0, 1]], [[1, 0]])  # id lists without texts are not mistaken for values
    m.reset()
    assert int(m.count) == 0


def test_edit_scores_empty_is_nan_without_crash():
    m = EditScores()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.compute()
    assert math.isnan(float(out["f1"])) and math.isnan(float(out["em"]))


# ------------------------------------------------------------------------------------------
# ScoreTable
# ------------------------------------------------------------------------------------------


def filled_table() -> ScoreTable:
    table = ScoreTable(["en", "zh"], settings=("teacher_forced", "greedy"))
    table.update("reliability", "en", [1.0, 1.0, 0.5], [1.0, 1.0, 0.0])
    table.update("reliability", "zh", [0.0], [0.0])
    table.update("Generality", "en", [0.75], [0.0])
    table.update("generalization", "zh", [0.25], [1.0])  # alias of generality
    table.update("locality", "en", [1.0], [1.0])
    table.update("locality", "zh", [1.0, 0.5], [1.0, 0.0])
    # portability/zh left empty
    table.update("portability", "en", [0.5], [0.0])
    table.update("reliability", "en", [0.2], [0.0], setting="greedy")
    return table


def test_score_table_nested_schema_and_macro_average():
    table = filled_table()
    res = table.compute()
    assert list(res) == list(METRICS)
    for row in res.values():
        assert list(row) == ["en", "zh", "avg"]
        for cell in row.values():
            assert set(cell) == {"f1", "em"} and all(isinstance(v, float) for v in cell.values())
    rel = res["reliability"]
    assert rel["en"] == {"f1": pytest.approx(250 / 3), "em": pytest.approx(200 / 3)}
    assert rel["zh"] == {"f1": 0.0, "em": 0.0}
    # macro over languages (not micro over the 4 samples, which would give 62.5)
    assert rel["avg"]["f1"] == pytest.approx((250 / 3 + 0) / 2)
    assert res["generality"]["zh"] == {"f1": 25.0, "em": 100.0}
    assert math.isnan(res["portability"]["zh"]["f1"])
    assert res["portability"]["avg"] == {"f1": 50.0, "em": 0.0}  # the empty language is skipped
    greedy = table.compute("greedy")
    assert greedy["reliability"]["en"]["f1"] == pytest.approx(20.0)
    assert math.isnan(greedy["locality"]["avg"]["f1"])
    assert set(table.compute_all()) == {"teacher_forced", "greedy"}
    flat = table.flat(results=res)
    assert flat["generality/zh/em"] == 100.0 and len(flat) == 4 * 3 * 2


def test_score_table_markdown_layout():
    table = filled_table()
    md = table.to_markdown("MzsRE, tiny")
    assert md == (
        "### MzsRE, tiny\n"
        "\n"
        "| Metric | en | zh | Avg |\n"
        "| --- | :---: | :---: | :---: |\n"
        "| Reliability | 83.3 / 66.7 | 0.0 / 0.0 | 41.7 / 33.3 |\n"
        "| Generality | 75.0 / 0.0 | 25.0 / 100.0 | 50.0 / 50.0 |\n"
        "| Locality | 100.0 / 100.0 | 75.0 / 50.0 | 87.5 / 75.0 |\n"
        "| Portability | 50.0 / 0.0 | n/a | 50.0 / 0.0 |\n"
    )
    assert table.to_markdown(results=table.compute()) == md.split("\n", 2)[2]


def test_score_table_add_predictions_and_errors():
    tok = word_tokenizer()
    table = ScoreTable(["en"])
    model = table_lm()
    pairs = teacher_forced_predictions(model, tok, PROMPTS[2:3], TARGETS[2:3])
    table.add_predictions("reliability", "en", tok, pairs)  # [London York City] vs [New York City]
    assert table.compute()["reliability"]["en"] == {"f1": pytest.approx(200 / 3), "em": 0.0}
    with pytest.raises(KeyError):
        table.update("fluency", "en", [1.0], [1.0])
    with pytest.raises(KeyError):
        table.update("reliability", "de", [1.0], [1.0])
    with pytest.raises(KeyError):
        table.compute("greedy")
    with pytest.raises(ValueError):
        ScoreTable(["en", "avg"])
    with pytest.raises(ValueError):
        ScoreTable(["en", "en"])
    assert isinstance(table, nn.Module) and len(list(table.modules())) > 1
    table.reset()
    assert math.isnan(table.compute()["reliability"]["en"]["f1"])


# ------------------------------------------------------------------------------------------
# DDP aggregation: two gloo processes each update half of the samples
# ------------------------------------------------------------------------------------------

DDP_PAIRS = [
    ([1, 2, 3], [2, 3, 4]),
    ([5, 5, 5], [5]),
    ([], []),
    ([7], [8]),
    ([1, 2], [1, 2]),
    ([4, 4, 6], [4, 6, 6]),
    ([9], [9, 9, 9]),
]
DDP_TEXTS = [("a", "a"), ("b", "c"), ("", ""), ("d", "e"), ("f ", "f"), ("g", "h"), ("i", "i")]


def _fill(metric: EditScores, table: ScoreTable, indices) -> None:
    indices = list(indices)
    if indices:
        metric.update(
            [DDP_PAIRS[i][0] for i in indices], [DDP_PAIRS[i][1] for i in indices],
            [DDP_TEXTS[i][0] for i in indices], [DDP_TEXTS[i][1] for i in indices],
        )
    for i in indices:
        lang = "en" if i % 2 == 0 else "zh"
        f1 = token_f1(*DDP_PAIRS[i])
        em = exact_match(*DDP_TEXTS[i])
        table.update("reliability", lang, [f1], [em])
        if i < 2:  # locality/en only gets samples 0 and 1, both on rank 0; rank 1 has none
            table.update("locality", "en", [f1], [em])


def _ddp_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        metric = EditScores()
        table = ScoreTable(["en", "zh"])
        # uneven split: rank 0 gets samples 0,1,2,3 ; rank 1 gets 4,5,6
        _fill(metric, table, range(0, 4) if rank == 0 else range(4, 7))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synced = {k: float(v) for k, v in metric.compute().items()}
            res = table.compute()
        local_count = int(metric.count)  # states are restored after the synced compute
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metric": synced, "table": res, "local_count": local_count}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_sync_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    # fork (where available) spares each child the ~5 s re-import of torch/torchmetrics that
    # spawn costs; the workers only use CPU tensors and gloo, which are fork-safe.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method=method
    )

    metric, table = EditScores(), ScoreTable(["en", "zh"])
    _fill(metric, table, range(len(DDP_PAIRS)))
    expected_metric = {k: float(v) for k, v in metric.compute().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_table = table.compute()

    for rank, local in ((0, 4), (1, 3)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["local_count"] == local
        assert got["metric"] == pytest.approx(expected_metric, rel=1e-12)
        for m, row in expected_table.items():
            for lang, cell in row.items():
                for k, v in cell.items():
                    g = got["table"][m][lang][k]
                    if math.isnan(v):
                        assert g is None or math.isnan(g)
                    else:
                        assert g == pytest.approx(v, rel=1e-12), (m, lang, k)
    assert expected_table["locality"]["en"]["f1"] == pytest.approx(
        100 * (token_f1(*DDP_PAIRS[0]) + token_f1(*DDP_PAIRS[1])) / 2
    )
