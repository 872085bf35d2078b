"""EditedModel at inference on a hand-written cache (no fit): several groups in one query, padded
batches, damaged and foreign caches, and text recovery from ids the tokenizer would not produce."""
from pathlib import Path

import pytest
import torch

from lafn_lightning.backbone.fingerprint import fingerprint
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.backbone.tiny import tiny_model, tiny_tokenizer
from lafn_lightning.cache import CacheEntry, CacheError, EditCache, FingerprintMismatch, write_shard
from lafn_lightning.inference.edited_model import EditedModel, token_spans
from lafn_lightning.backbone.hooks import Hooks, add_at_positions
from lafn_lightning.editing.prompts import last_token_of_span

LAYERS = [1, 2]
SUBJECTS = {
    "paris": {"en": "Paris", "ru": "Париж"},
    "berlin": {"en": "Berlin", "de": "Berlin"},
    "tolstoy": {"en": "Leo Tolstoy", "ru": "Лев Толстой"},
}
MULTI = "Did Leo Tolstoy travel from Paris to Berlin, or back to Paris?"
RUSSIAN = "Жил ли Лев Толстой в Париж?"
UNRELATED = "What is the tallest mountain in the world?"


def make_cache(path: Path, model) -> Path:
    """paris + berlin in shard a, tolstoy in shard b; random ΔV (fp16) on random masks."""
    fp = fingerprint(model, LAYERS)
    d_ff = model.config.intermediate_size
    gen = torch.Generator().manual_seed(0)

    def entry(gid):
        mask = torch.rand(len(LAYERS), d_ff, generator=gen) < 0.3
        return CacheEntry(gid, SUBJECTS[gid], tuple(LAYERS), mask, 2.0 * torch.randn(len(LAYERS), d_ff, generator=gen))

    write_shard(path, [entry("paris"), entry("berlin")], fp, shard_name="a")
    write_shard(path, [entry("tolstoy")], fp, shard_name="b")
    return path


@pytest.fixture(scope="module")
def model():
    return load_backbone("tiny-llama")[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, model):
    return make_cache(tmp_path_factory.mktemp("inference") / "cache", model)


def subject_position(text: str, subject: str, occurrence: int = 0) -> int:
    """Token index of the subject's last character (byte-level tiny tokenizer, <bos> first)."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(subject, start + 1)
    return len(text[: start + len(subject)].encode())  # = 1 (<bos>) + bytes - 1


def by_hand(model, cache_dir, enc, sites):
    """Forward with ΔV added by hand at (row, position) for each (row, position, group)."""
    cache = EditCache.open(cache_dir)
    with Hooks() as hooks:
        for j, layer in enumerate(LAYERS):
            for row, pos, gid in sites:
                delta = cache.entry(gid).delta[j]
                hooks.on_input(model.model.layers[layer].mlp.down_proj,
                               lambda x, _d=delta, _r=row, _p=pos: add_at_positions(
                                   x, torch.tensor([_r]), torch.tensor([_p]), _d[None]))
        return model(**enc).logits


def no_hooks_left(model) -> bool:
    """Only the hook load_backbone keeps for the model's lifetime (contiguous LM-head input) is left."""
    head = model.get_output_embeddings()
    return all(not m._forward_hooks and len(m._forward_pre_hooks) == (m is head) for m in model.modules())


def test_several_groups_in_one_query(model, cache_dir):
    tok = tiny_tokenizer()
    em = EditedModel(model, tok, cache_dir, delta_cache_size=1)  # fewer slots than groups per query
    for text, expected in [
        (MULTI, [("tolstoy", subject_position(MULTI, "Leo Tolstoy")), ("paris", subject_position(MULTI, "Paris")),
                 ("berlin", subject_position(MULTI, "Berlin")), ("paris", subject_position(MULTI, "Paris", 1))]),
        (RUSSIAN, [("tolstoy", subject_position(RUSSIAN, "Лев Толстой")), ("paris", subject_position(RUSSIAN, "Париж"))]),
    ]:
        enc = tok([text], return_tensors="pt")
        sites = em.find_sites(enc.input_ids, enc.attention_mask)
        assert [(s.group_id, s.position) for s in sites] == expected
        hand = [(0, pos, gid) for gid, pos in expected]
        edited = em(**enc).logits
        assert torch.allclose(edited, by_hand(model, cache_dir, enc, hand), atol=1e-5)
        for k in range(len(hand)):  # every site matters: leaving any one out changes the logits
            assert not torch.allclose(edited, by_hand(model, cache_dir, enc, hand[:k] + hand[k + 1:]), atol=1e-3)
        assert len(em._deltas) == 1
    assert no_hooks_left(model)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_the_unbatched_logits_per_row(model, cache_dir, side):
    tok = tiny_tokenizer()
    em = EditedModel(model, tok, cache_dir)
    queries = [MULTI, "Where is Berlin?", UNRELATED, RUSSIAN]
    single = []
    for q in queries:
        enc = tok([q], return_tensors="pt")
        single.append((em(**enc).logits[0], em.find_sites(enc.input_ids, enc.attention_mask)))
    tok.padding_side = side
    enc = tok(queries, return_tensors="pt", padding=True)
    assert len(set(enc.attention_mask.sum(1).tolist())) == len(queries)  # all lengths differ
    out = em(**enc).logits
    sites = em.find_sites(enc.input_ids, enc.attention_mask)
    for row, (logits, row_sites) in enumerate(single):
        real = enc.attention_mask[row].bool()
        assert torch.allclose(out[row, real], logits, atol=1e-4), (side, row)
        shift = int(real.nonzero()[0])  # padding in front of the row (left padding)
        assert [(s.group_id, s.position) for s in sites if s.row == row] == \
               [(s.group_id, s.position + shift) for s in row_sites]
    assert not [s for s in sites if s.row == 2]
    assert torch.equal(out[2], model(**enc).logits[2])  # the unmatched row runs the untouched model


def test_truncated_shard_is_reported_by_name_and_nothing_is_applied(model, tmp_path):
    tok = tiny_tokenizer()
    cache_dir = make_cache(tmp_path / "cache", model)
    shard = cache_dir / "shards" / "b.safetensors"
    tolstoy = tok(["Who was Leo Tolstoy?"], return_tensors="pt")
    paris = tok(["Where is Paris?"], return_tensors="pt")
    unrelated = tok([UNRELATED], return_tensors="pt")

    # truncated before the model opens the cache: opening is lazy, the first use fails
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    for check_hashes in (True, False):
        em = EditedModel(model, tok, EditCache.open(cache_dir, check_hashes=check_hashes))
        with pytest.raises(CacheError, match=r"b\.safetensors"):
            em(**tolstoy)
        with pytest.raises(CacheError, match=r"b\.safetensors"):
            em.generate(**tolstoy, max_new_tokens=2, do_sample=False)
        assert no_hooks_left(model)
        assert torch.equal(em(**unrelated).logits, model(**unrelated).logits)
        assert not torch.allclose(em(**paris).logits, model(**paris).logits, atol=1e-3)  # shard a is fine

    # truncated in place while the model holds the shard open: noticed (hashed again, or opened
    # again), never read through the old mapping (zeros past the end, or a crash on a big file)
    for check_hashes, message in ((True, "sha256"), (False, "truncated or corrupt")):
        fresh = make_cache(tmp_path / f"again-{check_hashes}", model)
        em = EditedModel(model, tok, EditCache.open(fresh, check_hashes=check_hashes))
        good = em(**tolstoy).logits
        assert not torch.allclose(good, model(**tolstoy).logits, atol=1e-3)
        em.clear_delta_cache()
        shard = fresh / "shards" / "b.safetensors"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        with pytest.raises(CacheError, match=rf"b\.safetensors.*{message}"):
            em(**tolstoy)
        assert no_hooks_left(model)


def test_cache_of_another_backbone_is_refused(model, cache_dir, tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(FingerprintMismatch, match="dtype") as info:
        EditedModel(tiny_model("llama").to(torch.bfloat16), tok, cache_dir)
    assert {"dtype", "layers_hash"} <= set(info.value.fields)

    qwen = tiny_model("qwen2")
    make_cache(tmp_path / "qwen", qwen)
    with pytest.raises(FingerprintMismatch, match="architecture"):
        EditedModel(model, tok, tmp_path / "qwen")

    # the fingerprint is memoised per model, but an in-place update of an edited layer is seen
    other = tiny_model("llama")  # same weights as the cached backbone
    EditedModel(other, tok, cache_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # not an edited layer: still accepted
    EditedModel(other, tok, cache_dir)
    with torch.no_grad():
        other.model.layers[LAYERS[-1]].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(FingerprintMismatch, match="layers_hash"):
        EditedModel(other, tok, cache_dir)


class _CountingTokenizer:
    """A tokenizer seen through its Python API only, counting the ids it decodes."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0
        self.all_special_ids = tok.all_special_ids
        self.backend_tokenizer = None

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)

    def __call__(self, *args, **kw):
        return self.tok(*args, **kw)


def test_token_spans_on_ids_the_tokenizer_would_not_produce():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    merges = [("P", "a"), ("r", "i"), ("ri", "s"), ("Pa", "ris")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")

    text = "Paris и Париж, " * 20 + "Paris"
    # one token per byte (as a model may generate), where the tokenizer itself would merge "Paris"
    ids = [0] + [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert ids[1:] != tok(text, add_special_tokens=False)["input_ids"]
    for t in (tok, _CountingTokenizer(tok)):
        got, spans = token_spans(t, ids)
        assert got == text and spans[0] == (0, 0)
        for i, (a, b) in enumerate(spans[1:], 1):
            assert text[a:b] == tok.decode([ids[i]]) or (b - a == 1 and len(text[a:b].encode()) == 2)
        # the last subject ends at the very last token; a Cyrillic letter's two byte tokens share its span
        assert last_token_of_span(spans, len(text) - 5, len(text)) == len(ids) - 1
        cyr = text.index("П")
        assert [i for i, s in enumerate(spans) if s == (cyr, cyr + 1)] == [cyr_tok := 1 + len(text[:cyr].encode()), cyr_tok + 1]
    assert t.decoded < 20 * len(ids)  # linear in the length (prefix decoding would be ~len²/2)
