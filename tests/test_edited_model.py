"""Applying a cache: matched queries get ΔV at the subject's last token, others run untouched."""
import pytest
import torch

from conftest import fit
from lafn_lightning import EditedModel
from lafn_lightning.backbone.tiny import tiny_model, tiny_tokenizer
from lafn_lightning.cache import EditCache, FingerprintMismatch
from lafn_lightning.backbone.hooks import Hooks, add_at_positions


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    import torch as _t
    _t.set_num_threads(1)
    fit(tmp, "--data.groups", "0:2", "--trainer.max_steps", "3")
    return tmp / "cache"


QUERY = "When was the inception of IAAF Combined Events Challenge?"
UNRELATED = "what is the name of the last episode of spongebob"


def test_match_applies_delta_at_subject_last_token(cache_dir):
    em = EditedModel.from_cache(cache_dir, backbone="tiny-llama")
    tok = em.tokenizer
    enc = tok([QUERY], return_tensors="pt")
    sites = em.find_sites(enc.input_ids, enc.attention_mask)
    assert [(s.group_id, s.subject) for s in sites] == [("mzsre:0", "IAAF Combined Events Challenge")]
    pos = sites[0].position
    assert tok.decode(enc.input_ids[0, 1: pos + 1]).endswith("Challenge")
    # The same forward done by hand with the cache's ΔV.
    delta = EditCache.open(cache_dir).entry("mzsre:0").delta
    with Hooks() as hooks:
        for j, layer in enumerate(em.layers):
            hooks.on_input(em.model.model.layers[layer].mlp.down_proj,
                           lambda x, _d=delta[j]: add_at_positions(x, torch.tensor([0]), torch.tensor([pos]), _d[None]))
        by_hand = em.model(**enc).logits
    edited = em(**enc).logits
    assert torch.allclose(edited, by_hand, atol=1e-5)
    assert not torch.allclose(edited, em.model(**enc).logits, atol=1e-3)


def test_unrelated_query_is_bit_identical_and_padding_sides_agree(cache_dir):
    em = EditedModel.from_cache(cache_dir, backbone="tiny-llama")
    tok = em.tokenizer
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok([QUERY, UNRELATED], return_tensors="pt", padding=True)
        out, base = em(**enc).logits, em.model(**enc).logits
        assert torch.equal(out[1], base[1])
        last = enc.attention_mask[0].nonzero().max()
        if side == "right":
            right_last = out[0, last]
        else:
            assert torch.allclose(out[0, last], right_last, atol=1e-4)
    tok.padding_side = "right"


def test_generate_applies_delta_once_at_prefill(cache_dir):
    em = EditedModel.from_cache(cache_dir, backbone="tiny-llama")
    enc = em.tokenizer([QUERY], return_tensors="pt")
    out = em.generate(**enc, max_new_tokens=4, do_sample=False)
    # Greedy decoding by hand: full forward of the edited model on the growing sequence,
    # ΔV only at the prompt's subject token.
    ids = enc.input_ids
    for _ in range(4):
        logits = em(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_fingerprint_mismatch_is_refused(cache_dir):
    other = tiny_model("llama", seed=1)
    with pytest.raises(FingerprintMismatch, match="layers_hash"):
        EditedModel(other, tiny_tokenizer(), cache_dir)


def test_from_cache_loads_the_backbone_in_the_dtype_the_edits_were_trained_in(tmp_path):
    fit(tmp_path, "--data.groups", "0:1", "--trainer.max_steps", "2", "--model.dtype", "bfloat16")
    em = EditedModel.from_cache(tmp_path / "cache", backbone="tiny-llama")
    assert next(em.model.parameters()).dtype == torch.bfloat16
    enc = em.tokenizer([QUERY], return_tensors="pt")
    assert em.find_sites(enc.input_ids, enc.attention_mask)          # the edit applies
    with pytest.raises(ValueError, match="dtype='bfloat16', but dtype='float32'"):
        EditedModel.from_cache(tmp_path / "cache", backbone="tiny-llama", dtype="float32")


@pytest.mark.parametrize("query, finds", [
    ("When was the inception of IAAF Combined-Events Challenge?", {"exact": False, "normalized": True, "fuzzy": True}),
    ("When were the IAAF Combined Events Challenges founded?", {"exact": False, "normalized": False, "fuzzy": True}),
])
def test_normalized_and_fuzzy_matchers_apply_the_edit_inside_edited_model(cache_dir, query, finds):
    from lafn_lightning.data import default_dataset, load_groups
    from lafn_lightning.evaluation.protocol import score_group
    from lafn_lightning.inference.edited_model import EditedModel as EM

    base = EditedModel.from_cache(cache_dir, backbone="tiny-llama")
    model, tok = base.model, base.tokenizer
    enc = tok([query], return_tensors="pt")
    plain = model(**enc).logits
    for matcher, found in finds.items():
        em = EM(model, tok, cache_dir, matcher=matcher)
        sites = em.find_sites(enc.input_ids, enc.attention_mask)
        assert bool(sites) == found, matcher
        logits = em(**enc).logits
        assert torch.equal(logits, plain) != found, matcher            # applied exactly where found
        if found:
            last = tok.decode(enc.input_ids[0, : sites[0].position + 1])
            assert last.endswith(("Challenge", "Challenges")), last
    # ... and inside the evaluation protocol: with the rephrase carrying the changed form, the edited
    # model is run on it (not skipped as "no site anywhere") exactly when its matcher finds it
    import dataclasses

    from lafn_lightning.evaluation import metrics

    group = load_groups(default_dataset(), languages=["en"], select=[0])[0]
    edit = dataclasses.replace(group.edits["en"], rephrase=query, portability_prompt=None, portability_answer=None,
                               locality_prompt=None, locality_answer=None, prompt=UNRELATED)
    group = dataclasses.replace(group, edits={"en": edit})
    for matcher, found in finds.items():
        em = EM(model, tok, cache_dir, matcher=matcher)
        runs = []
        real = metrics.teacher_forced_predictions

        def spy(target, *a, **k):
            runs.append(target.inner)
            return real(target, *a, **k)

        metrics.teacher_forced_predictions = spy
        try:
            score_group(model, tok, group, {"edit_one_test_one": em}, generation=False)
        finally:
            metrics.teacher_forced_predictions = real
        assert (em in runs) == found, matcher
