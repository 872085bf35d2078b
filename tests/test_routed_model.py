"""Router on a tiny model: keys from an edit's own prompts, sites that training and inference share."""
import pytest
import torch

from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.cache import CacheEntry, EditCache, write_shard
from lafn_lightning.data import EditGroup, LanguageEdit
from lafn_lightning.backbone.fingerprint import fingerprint as cached_fingerprint
from lafn_lightning.inference.routed_model import RoutedEditedModel
from lafn_lightning.routing.router import Router
from lafn_lightning.routing.build import add_group, group_keys, new_store
from lafn_lightning.routing.keys import KEYS_FILE
from lafn_lightning.routing.states import encode_with_offsets, token_states

LAYERS = [1, 2]
BACKGROUND = ["What is the capital of France?", "Who wrote this book?", "Когда родился поэт?",
              "ใครเป็นผู้กำกับ", "Wie heißt der Fluss?"]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_backbone("tiny-llama")


def group(gid: str, subject_en: str, prompt_en: str, subject_ru: str, prompt_ru: str) -> EditGroup:
    return EditGroup(gid, 0, {
        "en": LanguageEdit("en", subject_en, prompt_en, "x"),
        "ru": LanguageEdit("ru", subject_ru, prompt_ru, "y"),
    })


MOSCOW = group("moscow", "Moscow", "Where is Moscow located?", "Москва", "Где находится Moskva?")
PARIS = group("paris", "Paris", "Which river flows through Paris?", "Париж", "Какая река течёт через Париж?")


def test_token_states_do_not_depend_on_batching(tiny):
    model, tok = tiny
    texts = ["Where is Moscow?", "A much longer question about Paris and its rivers?"]
    batched = token_states(model, tok, texts, 2, batch_size=2)
    for text, b in zip(texts, batched):
        alone = token_states(model, tok, [text], 2)[0]
        ids = torch.tensor([encode_with_offsets(tok, text)[0]])
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        assert torch.allclose(b, alone, atol=1e-5)
        assert torch.allclose(b, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


def test_fallback_prompt_key_sits_where_the_router_fires(tiny):
    """The ru prompt has no subject form ("Moskva" for "Москва"): its key is the token closest to
    the anchors (rule "aligned"), and routing that very prompt fires there, at cosine 1."""
    model, tok = tiny
    store = new_store(model, tok, 2, BACKGROUND)
    keys, sites = group_keys(model, tok, store, MOSCOW)
    assert [s[2] for s in sites] == ["own", "aligned"]
    store.add("moscow", keys)
    router = Router(store, {"moscow": MOSCOW.subjects}, threshold=0.999)
    prompt = MOSCOW.edits["ru"].prompt
    ids, spans = encode_with_offsets(tok, prompt)
    routes = router.route(prompt, spans, token_states(model, tok, [prompt], 2)[0])
    assert [(r.group_id, r.position, r.stage) for r in routes] == [("moscow", sites[1][1], "state")]
    assert routes[0].score == pytest.approx(1.0, abs=1e-3)


def make_cache(tmp_path, model, tok):
    fp = cached_fingerprint(model, LAYERS)
    d_ff = model.config.intermediate_size
    g = torch.Generator().manual_seed(0)
    entries = []
    for grp in (MOSCOW, PARIS):
        mask = torch.zeros(len(LAYERS), d_ff, dtype=torch.bool)
        mask[:, :16] = True
        entries.append(CacheEntry(grp.group_id, {l: e.subject for l, e in grp.edits.items()}, tuple(LAYERS),
                                  mask, torch.where(mask, torch.randn(len(LAYERS), d_ff, generator=g), 0.0)))
    write_shard(tmp_path / "cache", entries, fp)
    store = new_store(model, tok, 1, BACKGROUND, fingerprint=fp)
    for grp in (MOSCOW, PARIS):
        add_group(model, tok, store, grp)
    store.threshold = 0.999
    store.save(tmp_path / "cache" / KEYS_FILE)
    return tmp_path / "cache"


def test_routed_model_applies_the_edit_where_the_router_fires(tiny, tmp_path):
    model, tok = tiny
    cache = make_cache(tmp_path, model, tok)
    em = RoutedEditedModel(model, tok, cache)
    ru = MOSCOW.edits["ru"].prompt   # transliterated subject: the exact matcher finds nothing
    enc = tok([ru], return_tensors="pt")
    sites = em.find_sites(enc.input_ids, enc.attention_mask)
    assert [s.group_id for s in sites] == ["moscow"]
    with torch.no_grad():
        assert not torch.allclose(em(**enc).logits, model(**enc).logits)
        other = tok(["Tell me a story about a cat."], return_tensors="pt")
        assert em.find_sites(other.input_ids) == []
        assert torch.equal(em(**other).logits, model(**other).logits)
    # exact stage: the cached subject string
    en = tok(["Which river flows through Paris?"], return_tensors="pt")
    assert [s.group_id for s in em.find_sites(en.input_ids)] == ["paris"]


def test_group_deleted_from_the_cache_no_longer_routes(tiny, tmp_path):
    model, tok = tiny
    cache = make_cache(tmp_path, model, tok)
    EditCache.open(cache).delete("moscow")
    em = RoutedEditedModel(model, tok, cache)
    enc = tok([MOSCOW.edits["ru"].prompt], return_tensors="pt")
    assert em.find_sites(enc.input_ids) == []
    assert "moscow" not in em.router and "paris" in em.router


def test_routed_subject_span_replaces_the_fallback(tiny):
    from lafn_lightning.routing.build import anchor_keys, routed_subject_span

    model, tok = tiny
    store = new_store(model, tok, 2, BACKGROUND)
    keys, sites = group_keys(model, tok, store, MOSCOW)
    anchors = anchor_keys(model, tok, store, MOSCOW)
    assert torch.allclose(anchors, keys[:2], atol=1e-5)
    ru = MOSCOW.edits["ru"]
    s0, s1, rule = routed_subject_span(model, tok, store, ru.prompt, ru.subject, MOSCOW.subjects, anchors)
    ids, spans = encode_with_offsets(tok, ru.prompt)
    assert rule == "aligned" and spans[sites[1][1]] == (s0, s1)
    en = MOSCOW.edits["en"]
    assert routed_subject_span(model, tok, store, en.prompt, en.subject, MOSCOW.subjects, anchors)[2] == "own"


def test_router_matcher_plugs_into_match_report(tiny, tmp_path):
    from lafn_lightning.evaluation.match_report import measure
    from lafn_lightning.inference.routed_model import RouterMatcher

    model, tok = tiny
    em = RoutedEditedModel(model, tok, make_cache(tmp_path, model, tok))
    counts = measure([MOSCOW, PARIS], "router", matcher=RouterMatcher(em.router, model, tok))
    # every edit prompt is found by its own group: en by the exact stage, ru "Moskva" by state
    assert counts["ru"].found["prompt"] == 2 and counts["en"].found["prompt"] == 2


def test_edited_model_with_matcher_router_is_the_routed_model(tiny, tmp_path):
    from lafn_lightning.inference import EditedModel

    model, tok = tiny
    cache = make_cache(tmp_path, model, tok)
    em = EditedModel(model, tok, cache, matcher="router")
    assert isinstance(em, RoutedEditedModel)
    enc = tok([MOSCOW.edits["ru"].prompt], return_tensors="pt")
    assert [s.group_id for s in em.find_sites(enc.input_ids, enc.attention_mask)] == ["moscow"]
    assert type(EditedModel(model, tok, cache, matcher="exact")) is EditedModel


def test_one_pass_forward_equals_routing_first_then_running(tiny, tmp_path):
    """forward() routes inside the same pass (pre-hook at the router's layer); it must give the
    logits of find_sites() + a forward with those sites, on a padded batch of hits and misses."""
    from lafn_lightning.inference.edited_model import EditedModel

    model, tok = tiny
    em = RoutedEditedModel(model, tok, make_cache(tmp_path, model, tok))
    texts = [MOSCOW.edits["ru"].prompt, "Tell me a story about a cat, please, now.", "Which river flows through Paris?"]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    calls = []
    original = em.find_sites
    em.find_sites = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad():
        one_pass = em(**enc).logits
        assert calls == []                                  # no separate routing forward
        two_pass = EditedModel.forward(em, **enc).logits     # find_sites, then the hooked forward
    assert calls == [1]
    assert [s.group_id for s in original(enc.input_ids, enc.attention_mask)] == ["moscow", "paris"]
    assert torch.allclose(one_pass, two_pass, atol=1e-5)
    with torch.no_grad():
        base = model(**enc).logits
    assert not torch.allclose(one_pass[0], base[0]) and torch.allclose(one_pass[1], base[1], atol=1e-6)
