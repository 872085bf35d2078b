"""The edit router: hand-made keys for cross-script routing, near misses, removal, key files."""
import pytest
import torch

from lafn_lightning.backbone.fingerprint import FingerprintMismatch
from lafn_lightning.routing.router import Router, VectorIndex, calibrate_threshold
from lafn_lightning.routing.keys import KeyStore

D = 16


def unit(i: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Basis vector e_i, optionally tilted by ``noise`` towards a random direction."""
    v = torch.zeros(D)
    v[i] = 1.0
    if noise:
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(D, generator=g)
        r -= r[i] * v
        v = v + noise * r / r.norm()
    return v / v.norm()


def spans_of(words: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """A BOS token (empty span) plus one token per word, as token_spans would give."""
    text, spans = "", [(0, 0)]
    for w in words:
        if text:
            text += " "
        spans.append((len(text), len(text) + len(w)))
        text += w
    return text, spans


def states_for(n_tokens: int, at: dict[int, torch.Tensor]) -> torch.Tensor:
    """Background states on the last basis axes (far from every key) with given rows set."""
    s = torch.stack([unit(D - 1 - (i % 3)) for i in range(n_tokens)])
    for i, v in at.items():
        s[i] = v
    return s


@pytest.fixture
def store() -> KeyStore:
    s = KeyStore(layer=4, fingerprint={"name": "tiny", "layers": [1]})
    s.add("moscow", torch.stack([unit(0), unit(1)]))   # e.g. its ru and en prompts
    s.add("bangkok", torch.stack([unit(2), unit(3)]))
    return s


SUBJECTS = {"moscow": ["Москва", "Moscow"], "bangkok": ["กรุงเทพมหานคร", "Bangkok"]}


def test_exact_stage_fires_at_subject_last_token(store):
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["Where", "is", "Moscow", "?"])
    routes = router.route(text, spans, None)
    assert [(r.group_id, r.position, r.stage) for r in routes] == [("moscow", 3, "exact")]


def test_transliterated_subject_fires_on_its_state(store):
    # "Moskva" (transliterated): no subject string occurs, the state is close to a key.
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["Where", "is", "Moskva", "located", "?"])
    routes = router.route(text, spans, states_for(len(spans), {3: unit(1, noise=0.3)}))
    assert [(r.group_id, r.position, r.stage, r.rule) for r in routes] == [("moscow", 3, "state", "token")]
    assert 0.8 <= routes[0].score < 1.0


def test_inflected_subject_site_is_the_subject_not_the_best_token(store):
    # Russian locative "Москве": the fuzzy rule (as in training's subject_span) owns the site,
    # even when a later token's state matched best.
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["Что", "находится", "в", "Москве", "сейчас", "?"])
    routes = router.route(text, spans, states_for(len(spans), {5: unit(0, noise=0.2)}))
    assert [(r.group_id, r.position, r.rule) for r in routes] == [("moscow", 4, "subject")]


def test_translated_subject_in_another_script(store):
    # Thai query, subject not spelled as cached: routed by state to the right group.
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["บางกอก", "อยู่", "ที่ไหน"])
    routes = router.route(text, spans, states_for(len(spans), {1: unit(3, noise=0.4, seed=1)}))
    assert [r.group_id for r in routes] == ["bangkok"]


def test_near_miss_does_not_fire(store):
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["Where", "is", "Moskvich", "?"])
    near = unit(0, noise=1.2)  # cosine ~0.64 with the moscow key
    assert 0.5 < float(near @ unit(0)) < 0.8
    assert router.route(text, spans, states_for(len(spans), {3: near})) == []


def test_removed_group_no_longer_fires(store):
    router = Router(store, SUBJECTS, threshold=0.8)
    text, spans = spans_of(["Where", "is", "Moscow", "or", "Moskva", "?"])
    states = states_for(len(spans), {5: unit(1)})
    assert {r.group_id for r in router.route(text, spans, states)} == {"moscow"}
    router.remove("moscow")
    assert router.route(text, spans, states) == []
    assert "moscow" not in router
    with pytest.raises(KeyError):
        router.remove("moscow")
    # the other group still routes
    assert [r.group_id for r in router.route(*spans_of(["Bangkok", "?"]), None)] == ["bangkok"]


def test_state_stage_picks_the_best_group_only(store):
    router = Router(store, SUBJECTS, threshold=0.5)
    text, spans = spans_of(["a", "b", "c"])
    states = states_for(len(spans), {1: unit(0, noise=0.5), 2: unit(2, noise=0.2)})
    assert [r.group_id for r in router.route(text, spans, states)] == ["bangkok"]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_index_kinds_agree_and_skip_removed_rows(kind):
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(500, D, generator=g), dim=-1)
    ix = VectorIndex(D, kind=kind)
    ix.add(keys)
    q = keys[[3, 77, 401]] + 0.01 * torch.randn(3, D, generator=g)
    assert ix.search(q, k=1)[1][:, 0].tolist() == [3, 77, 401]
    ix.remove([77])
    scores, rows = ix.search(q, k=2)
    assert 77 not in rows[1].tolist() and rows[0, 0] == 3


def test_key_file_round_trip_and_fingerprint(store, tmp_path):
    path = store.save(tmp_path / "keys.safetensors")
    back = KeyStore.load(path, fingerprint={"name": "tiny", "layers": [1]})
    assert back.layer == 4 and back.group_ids() == ["moscow", "bangkok"]
    assert back.keys("moscow").dtype == torch.float16
    assert torch.allclose(back.keys("moscow").float(), store.keys("moscow").float())
    with pytest.raises(FingerprintMismatch):
        KeyStore.load(path, fingerprint={"name": "other", "layers": [1]})


def test_keys_survive_a_merge(store, tmp_path):
    other = KeyStore(layer=4, fingerprint={"name": "tiny", "layers": [1]})
    other.add("paris", unit(5)[None])
    other.add("bangkok", unit(6)[None])  # later store wins
    a = KeyStore.load(store.save(tmp_path / "a.safetensors"))
    b = KeyStore.load(other.save(tmp_path / "b.safetensors"))
    merged = KeyStore.load(KeyStore.merge([a, b]).save(tmp_path / "m.safetensors"))
    assert sorted(merged.group_ids()) == ["bangkok", "moscow", "paris"]
    router = Router(merged, {**SUBJECTS, "paris": ["Paris"]}, threshold=0.8)
    text, spans = spans_of(["Ville", "lumière", "?"])
    assert [r.group_id for r in router.route(text, spans, states_for(len(spans), {2: unit(5)}))] == ["paris"]
    assert [r.group_id for r in router.route(text, spans, states_for(len(spans), {2: unit(6)}))] == ["bangkok"]
    assert router.route(text, spans, states_for(len(spans), {2: unit(2)})) == []  # old bangkok key gone
    with pytest.raises(FingerprintMismatch):
        KeyStore.merge([a, KeyStore(4, {"name": "other"})])


def test_prune_drops_groups_deleted_from_the_cache(store):
    assert store.prune(["bangkok"]) == ["moscow"]
    assert store.group_ids() == ["bangkok"]


def test_calibrated_threshold_rejects_the_negatives():
    neg = [0.1, 0.5, 0.42, 0.61, 0.3]
    t = calibrate_threshold(neg, false_rate=0.0)
    assert all(s < t for s in neg) and t < 0.62
    assert sum(s >= calibrate_threshold(neg, false_rate=0.2) for s in neg) == 1


def test_lexical_rule_accepts_a_lower_cosine_only_with_the_subject_spelled(store):
    router = Router(store, SUBJECTS, threshold=0.95, lexical_threshold=0.6, lexical_min=0.5)
    mid = unit(0, noise=0.8)  # cosine ~0.78: below threshold, above lexical_threshold
    assert 0.6 < float(mid @ unit(0)) < 0.95
    inflected = spans_of(["Что", "в", "Москве", "?"])      # most of "Москва" spelled
    unrelated = spans_of(["Что", "в", "Казани", "?"])
    assert [r.group_id for r in router.route(*inflected, states_for(5, {3: mid}))] == ["moscow"]
    assert router.route(*unrelated, states_for(5, {3: mid})) == []
