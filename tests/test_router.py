"""The edit router: hand-made keys for cross-script routing, near misses, removal, key files."""
import pytest
import torch

from lafn_lightning.backbone.fingerprint import FingerprintMismatch
from lafn_lightning.routing.router import Router, VectorIndex, calibrate_threshold
from lafn_lightning.routing.keys import KeyStore
from lafn_lightning.routing.lexical import end_supports, lexical_support

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


# --- lexical-first lookup (threshold > 1: only groups with lexical support can fire) ---------

LEX_SUBJECTS = {
    "moscow": ["Moscow", "Москва"], "bangkok": ["Bangkok", "กรุงเทพมหานคร"], "paris": ["Paris", "巴黎"],
    "berlin": ["Berlin", "柏林"], "cohendy": ["Christiane Cohendy"], "flames": ["Atlanta Flames", "亚特兰大火焰队"],
    "hepburn": ["Cameron Hepburn"], "marshalls": ["Marshalls"], "creech": ["Jesse Orin Creech"],
    "barnett": ["Doris Barnett", "多丽丝·巴尼特"], "warner": ["Guy Warner", "盖伊·沃纳"],
    "evry": ["Évry Cathedral", "埃夫里大教堂"],
}


def lex_store() -> KeyStore:
    s = KeyStore(layer=4)
    for i, g in enumerate(LEX_SUBJECTS):   # group i: keys near axis i (axes 13..15: background)
        s.add(g, torch.stack([unit(i), unit(i, noise=0.3, seed=100 + i)]))
    return s


def lex_routers(**kw) -> tuple[Router, Router]:
    args = dict(threshold=1.0001, lexical_threshold=0.6, lexical_min=0.5, index="flat", **kw)
    return Router(lex_store(), LEX_SUBJECTS, lookup="index", **args), Router(lex_store(), LEX_SUBJECTS, **args)


def no_search(*a, **k):
    raise AssertionError("the lexical-first path must not search the vector index")


#: the demo backbone's calibrated rule: state-only routing off, lexical support at cosine 0.875
DEMO_RULE = dict(threshold=1.0001, lexical_threshold=0.875, index="flat")


def axis_store(*group_ids: str) -> KeyStore:
    """One key per group: the i-th group's on basis axis i."""
    store = KeyStore(layer=4)
    for i, g in enumerate(group_ids):
        store.add(g, unit(i)[None])
    return store


def test_lexical_first_lookup_gives_the_index_lookups_routes():
    by_index, lexical = lex_routers(stage1=None)
    assert lexical.uses_lexical and not by_index.uses_lexical
    for r in (by_index, lexical):   # a group with a radius: fires only above it
        r.add("ville", unit(12)[None], ["Ville lumière"], radii=torch.tensor([0.95]))
    lexical.index.search = no_search
    cases, expected = [], []
    for i, (g, subs) in enumerate(LEX_SUBJECTS.items()):
        words = ["Where", "is", *subs[0].split(), "now", "?"]
        at = 2 + len(subs[0].split())   # the last subject word (token 0: BOS)
        near, other = unit(i, noise=0.5, seed=i), unit((i + 1) % 12, noise=0.5, seed=i)
        cases += [(words, {at: near}), (words, {at + 1: other}), (["Where", "is", "it", "?"], {2: unit(i)})]
        expected += [[(g, at, "subject")], [], []]            # own subject + near state: fires; else never
        if len(subs) > 1:                                     # the other language's subject, inflected
            words = ["Москве" if g == "moscow" else subs[1], "где", "?"]
            cases.append((words, {1: near}))
            expected.append([(g, 1, "subject")])
    cases += [(["Ville", "lumière", "?"], {2: unit(12, noise=0.5)}), (["Ville", "lumière", "?"], {2: unit(12, noise=0.2)})]
    expected += [[], [("ville", 2, "subject")]]                # cosine 0.89 < radius 0.95 < 0.98
    for (words, at), want in zip(cases, expected):
        text, spans = spans_of(words)
        states = states_for(len(spans), at)
        a, b = by_index.route(text, spans, states), lexical.route(text, spans, states)
        assert [(r.group_id, r.position, r.rule) for r in b] == want, (text, b)
        assert [(r.group_id, r.position, r.stage, r.rule) for r in a] == [(r.group_id, r.position, r.stage, r.rule) for r in b]
        assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-6)
        assert by_index.scores(states, list(range(1, len(spans))), margins=True).keys() >= \
            lexical.scores(states, list(range(1, len(spans))), margins=True, text=text).keys()


def test_lookup_option_is_checked():
    with pytest.raises(ValueError):
        Router(lex_store(), LEX_SUBJECTS, threshold=0.9, lexical_threshold=0.6, lookup="lexical")
    with pytest.raises(ValueError):
        Router(lex_store(), LEX_SUBJECTS, threshold=1.0001, lookup="nearest")
    # state-only routing on (threshold <= 1): the index path, unchanged
    assert not Router(lex_store(), LEX_SUBJECTS, threshold=0.9, lexical_threshold=0.6).uses_lexical


def test_subject_below_lexical_min_is_never_a_candidate():
    from lafn_lightning.routing.lexical import lexical_support
    _, router = lex_routers(stage1=None)
    router.index.search = no_search
    text, spans = spans_of(["Who", "is", "Christian", "Dior", "?"])
    assert 0.2 < lexical_support(text, LEX_SUBJECTS["cohendy"]) < 0.5   # shares n-grams, below lexical_min
    states = states_for(len(spans), {3: unit(4)})                         # its key exactly: cosine 1
    assert "cohendy" not in router.lexical_candidates(text)
    assert router.scores(states, list(range(1, len(spans))), margins=True, text=text) == {}
    assert router.route(text, spans, states) == []
    full = spans_of(["Who", "is", "Christiane", "Cohendy", "?"])
    assert router.lexical_candidates(full[0]) == ["cohendy"]
    assert [r.group_id for r in router.route(*full, states)] == ["cohendy"]


def test_removed_group_is_no_longer_a_lexical_candidate():
    _, router = lex_routers(stage1=None)
    router.add("moscow_ru", unit(0, noise=0.1)[None], ["Москва"])        # shares a subject with "moscow"
    text, spans = spans_of(["Что", "в", "Москве", "?"])
    states = states_for(len(spans), {3: unit(0, noise=0.5)})
    assert router.lexical_candidates(text) == ["moscow", "moscow_ru"]
    router.remove("moscow")
    assert router.lexical_candidates(text) == ["moscow_ru"]              # the shared subject stays
    assert router._lexical.groups(text) == {"moscow_ru"} and "moscow" not in router._lexical
    assert [r.group_id for r in router.route(text, spans, states)] == ["moscow_ru"]
    router.remove("moscow_ru")
    assert router.lexical_candidates(text) == [] and router.route(text, spans, states) == []
    assert router._lexical.groups(text) == set()                          # its n-grams unposted
    router.add("moscow", unit(0)[None], ["Moskau"])                       # re-added, other subject
    assert router.lexical_candidates(text) == []
    assert router.lexical_candidates("Wo liegt Moskau?") == ["moscow"]
    # compaction (many removals) rebuilds the rows; the lookup follows
    for j in range(1500):
        router.add(f"x{j}", unit(12, noise=0.5, seed=j)[None], [f"Filler {j:04d} Town"])
    for j in range(1400):
        router.remove(f"x{j}")
    assert len(router.index._vecs) < 1000   # compacted
    text, spans = spans_of(["Where", "is", "Filler", "1450", "Town", "?"])
    assert "x1450" in router.lexical_candidates(text) and "x1000" not in router.lexical_candidates("Filler 1000 Town")
    hit = router.route(text, spans, states_for(len(spans), {5: unit(12, noise=0.5, seed=1450)}))
    assert [r.group_id for r in hit] == ["x1450"] and hit[0].score == pytest.approx(1.0, abs=1e-5)


def test_radii_added_after_a_lookup_still_count():
    """The lexical-first path keeps the keys' radii as an array: a group added (or replaced) after
    the router has scored queries must still fire only above its own radius."""
    _, router = lex_routers(stage1=None)
    text, spans = spans_of(["Ville", "lumière", "?"])
    at = {2: unit(12, noise=0.5)}                            # cosine 0.89 with the key below
    assert router.route(text, spans, states_for(len(spans), at)) == []   # scored once: arrays made
    router.add("ville", unit(12)[None], ["Ville lumière"], radii=torch.tensor([0.95]))
    assert router.route(text, spans, states_for(len(spans), at)) == []   # 0.89 < radius 0.95
    router.add("ville", unit(12)[None], ["Ville lumière"], radii=torch.tensor([0.5]))
    assert [r.group_id for r in router.route(text, spans, states_for(len(spans), at))] == ["ville"]
    for j in range(1500):                                    # compaction re-makes the rows and radii
        router.add(f"x{j}", unit(13, noise=0.5, seed=j)[None], [f"Filler {j:04d} Town"])
    for j in range(1400):
        router.remove(f"x{j}")
    assert len(router.index._vecs) < 1000
    router.add("ville", unit(12)[None], ["Ville lumière"], radii=torch.tensor([0.95]))
    assert router.route(text, spans, states_for(len(spans), at)) == []


@pytest.mark.parametrize("overlap", [1, 2, 3])
@pytest.mark.parametrize("share", [0.5, 0.34, 0.75, 1.0])
def test_prefix_filtering_finds_every_subject_reaching_lexical_min(share, overlap):
    """Property: the inverted index with prefix filtering finds exactly the groups that a brute
    force ``lexical_support >= share`` finds, on random strings built to sit at the boundary,
    under incremental adds, removals and rebuilds."""
    import random

    from lafn_lightning.routing.lexical import SubjectGramIndex, _grams, _need, fold, lexical_support

    rng = random.Random(int(share * 100))
    latin, cjk = "abcdeéfgh", "中文东京大学北"

    def word(alphabet: str) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))

    def subject() -> str:
        if rng.random() < 0.3:
            return word(cjk)
        return " ".join(word(latin) for _ in range(rng.randint(1, 3))).title()

    ix = SubjectGramIndex(share, overlap=overlap, rebuild_from=8)
    ix_edges = SubjectGramIndex(share, overlap=overlap, rebuild_from=8, edges=True)
    groups: dict[str, list[str]] = {}
    with_edges = one_end_only = 0
    boundary = 0
    for step in range(400):
        gid = f"g{step}"
        groups[gid] = [subject() for _ in range(rng.randint(1, 2))]
        ix.add(gid, groups[gid])
        ix_edges.add(gid, groups[gid])
        if rng.random() < 0.25 and len(groups) > 1:
            gone = rng.choice(sorted(groups))
            ix.remove(gone)
            ix_edges.remove(gone)
            del groups[gone]
        # a query made of part of a cached subject's n-grams (near the boundary) plus noise
        s = fold(rng.choice(groups[rng.choice(sorted(groups))]))
        n = 2 if any(c in cjk for c in s) else 3
        grams = sorted(_grams(s, n))
        keep = rng.sample(grams, min(len(grams), max(0, _need(len(grams), share) + rng.choice([-1, 0, 0, 1]))))
        query = " | ".join([*keep, word(latin), word(cjk)])
        want = {g for g, subs in groups.items() if lexical_support(query, subs) >= share}
        hits = len(set(grams) & _grams(fold(query), n))
        boundary += hits == _need(len(grams), share)   # exactly the fewest n-grams that reach share
        assert ix.groups(query) == want, (query, want)
        assert ix.supports(query) == {g: lexical_support(query, groups[g]) for g in want}
        edged = {g: lexical_support(query, subs, edges=True) for g, subs in groups.items()}
        assert ix_edges.supports(query) == {g: v for g, v in edged.items() if v >= share}
        ends = {g: end_supports(query, subs) for g, subs in groups.items()}
        assert ix_edges.end_supports(query) == {g: (b if b >= share else 0.0, o) for g, (b, o) in ends.items() if o >= share}
        one_end_only += any(o >= share > b for b, o in ends.values())
        with_edges += any(v >= share for v in edged.values())
    assert boundary >= 100  # the exact boundary was exercised
    assert with_edges >= 20  # and queries that the edge rule lets through
    assert one_end_only >= 20 or share == 1.0  # and queries where only one end is spelled (at 1.0: both are)


# --- lexical tiers and aliases -----------------------------------------------------

@pytest.mark.parametrize("lookup", ["index", "lexical"])
def test_a_lexical_tier_accepts_a_low_cosine_only_with_most_of_the_subject_spelled(lookup):
    # Genitive "Ненада Стаменковича": the state at the inflected last token drifts from the key
    # (cosine ~0.7), the spelling stays (support ~0.8); a word that shares only half does not pass.
    store = axis_store("nenad")
    subjects = {"nenad": ["Ненад Стаменкович"]}
    args = dict(DEMO_RULE, lookup=lookup)
    drift = unit(0, noise=1.0)
    assert 0.6 < float(drift @ unit(0)) < 0.875
    genitive = spans_of(["Где", "играл", "Ненада", "Стаменковича", "?"])
    half = spans_of(["Где", "играл", "Стаменко", "?"])
    assert 0.7 <= lexical_support(genitive[0], subjects["nenad"]) and lexical_support(half[0], subjects["nenad"]) < 0.7
    one_tier, two_tiers = Router(store, subjects, **args), Router(store, subjects, lexical_tiers=[(0.7, 0.6)], **args)
    states = states_for(6, {4: drift})
    assert one_tier.route(*genitive, states) == []
    assert [(r.group_id, r.position, r.rule) for r in two_tiers.route(*genitive, states)] == [("nenad", 4, "subject")]
    assert two_tiers.route(*half, states_for(5, {3: drift})) == []
    assert two_tiers.route(*genitive, states_for(6, {4: unit(0, noise=3.0)})) == []   # cosine below 0.6


def test_lexical_tiers_are_checked():
    store = KeyStore(layer=4)
    store.add("g", unit(0)[None])
    with pytest.raises(ValueError, match="lexical_min"):
        Router(store, {"g": ["x"]}, threshold=1.0001, lexical_threshold=0.8, lexical_tiers=[(0.3, 0.5)])
    with pytest.raises(ValueError, match="lexical_threshold"):
        Router(store, {"g": ["x"]}, threshold=1.0001, lexical_tiers=[(0.7, 0.5)])


def test_an_alias_lets_the_prompts_own_wording_fire_but_never_stage_1(tmp_path):
    # Subject "Позвонить доктору"; the edit prompt says «Вызовите доктора» (an aligned key there).
    store = KeyStore(layer=4, fingerprint={"name": "tiny"})
    store.add("doctor", unit(0)[None], aliases=["«Вызовите доктора»"])
    store = KeyStore.load(store.save(tmp_path / "k.safetensors"))        # aliases survive the file
    assert store.aliases("doctor") == ["«Вызовите доктора»"]
    subjects = {"doctor": ["Позвонить доктору", "Call the Doctor"]}
    text, spans = spans_of(["Кто", "создал", "«Вызовите", "доктора»?"])
    args = DEMO_RULE
    routes = Router(store, subjects, **args).route(text, spans, states_for(5, {4: unit(0)}))
    assert [(r.group_id, r.position, r.stage) for r in routes] == [("doctor", 4, "state")]
    assert Router(store, subjects, aliases={}, **args).route(text, spans, states_for(5, {4: unit(0)})) == []
    assert Router(store, subjects, **args).route(text, spans, None) == []     # no stage-1 match on an alias
    store.prune([])
    assert store.all_aliases() == {}


def test_keys_and_aliases_survive_a_merge_and_a_replacement():
    a, b = KeyStore(layer=4), KeyStore(layer=4)
    a.add("g", unit(0)[None], aliases=["old form"])
    b.add("g", unit(1)[None])                       # a refit without aliases replaces them
    b.add("h", unit(2)[None], aliases=["other form"])
    merged = KeyStore.merge([a, b])
    assert merged.aliases("g") == [] and merged.aliases("h") == ["other form"]
    assert KeyStore.merge([b, a]).aliases("g") == ["old form"]


def test_group_aliases_take_the_aligned_prompts_words_and_drop_common_ones():
    from lafn_lightning.backbone.tiny import tiny_tokenizer
    from lafn_lightning.data.records import EditGroup, LanguageEdit
    from lafn_lightning.routing.build import group_aliases
    from lafn_lightning.routing.states import encode_with_offsets

    tok = tiny_tokenizer()
    ru = LanguageEdit("ru", "Позвонить доктору", "Какой художник создал «Вызовите доктора»?", "X")
    cz = LanguageEdit("cz", "Cluster motýlů", "Jaké souhvězdí je domovem Motýlí hvězdokupa?", "Y")
    group = EditGroup("g", 0, {"ru": ru, "cz": cz})

    def site(edit, char):   # the token whose span ends at character ``char`` (an aligned key's site)
        return [i for i, (a, b) in enumerate(encode_with_offsets(tok, edit.prompt)[1]) if b == char][-1]

    sites = [("ru", site(ru, ru.prompt.index("»") + 1), "aligned"), ("cz", site(cz, 4), "aligned")]
    background = ["Jaké je hlavní město?", "Jaké barvy má vlajka?", "Кто написал роман?"]
    assert group_aliases(tok, group, sites, background=background) == ["«Вызовите доктора»"]   # "Jaké": common
    assert group_aliases(tok, group, sites, background=[]) == ["«Вызовите доктора»", "Jaké"]
    assert group_aliases(tok, group, [("ru", sites[0][1], "own")], background=[]) == []   # subject sites: none


# --- both ends of a subject spelled -----------------------------------------------

@pytest.mark.parametrize("lookup", ["index", "lexical"])
def test_one_shared_word_of_a_longer_name_does_not_lower_the_cosine(lookup):
    # Locality question "When does Thomas Rhett's album come out?" against a cached "Marlo Thomas":
    # half the subject's n-grams are spelled (its last word), and a name's last-token state sits
    # close to the key. The rule without ends fired; with both ends required it does not, while an
    # inflected mention of both words ("Ненада Стаменковича") still lowers the cosine.
    store = axis_store("marlo", "nenad")
    subjects = {"marlo": ["Marlo Thomas"], "nenad": ["Ненад Стаменкович"]}
    args = dict(DEMO_RULE, lexical_tiers=[(0.7, 0.6)], lookup=lookup)
    other = spans_of(["When", "does", "Thomas", "Rhett's", "album", "come", "out?"])
    assert lexical_support(other[0], subjects["marlo"]) >= 0.5
    near = states_for(8, {3: unit(0, noise=0.3)})   # cosine ~0.96 at "Thomas"
    assert float(near[3] @ unit(0)) > 0.875
    assert [r.group_id for r in Router(store, subjects, edges=False, **args).route(*other, near)] == ["marlo"]
    assert Router(store, subjects, **args).route(*other, near) == []
    own = spans_of(["Where", "is", "Marlo", "Thomas", "from?"])
    assert [r.group_id for r in Router(store, subjects, **args).route(*own, states_for(6, {4: unit(0, noise=0.3)}))] == ["marlo"]
    genitive = spans_of(["Где", "играл", "Ненада", "Стаменковича", "?"])
    drift = unit(1, noise=1.0)   # cosine ~0.7: only the 0.7 tier accepts it
    assert [r.group_id for r in Router(store, subjects, **args).route(*genitive, states_for(6, {4: drift}))] == ["nenad"]


# --- one end spelled, near-identical state -----------------------------------------

@pytest.mark.parametrize("lookup", ["index", "lexical"])
def test_a_one_end_tier_fires_only_at_a_near_identical_cosine(lookup):
    # «конкурс ИААФ по многоборью» for the cached "Соревнования ИААФ по многоборью": the head word
    # is translated, so only the last end is spelled and the both-ends tiers never count it. A
    # [0.5, 0.98, 1] tier lets it fire where the state is near-identical to the key, and only there:
    # the same mention at cosine 0.96, or a shared word of another name, stays unrouted.
    store = axis_store("iaaf")
    subjects = {"iaaf": ["Соревнования ИААФ по многоборью"]}
    args = dict(DEMO_RULE, lookup=lookup)
    text, spans = spans_of(["Когда", "был", "запущен", "конкурс", "ИААФ", "по", "многоборью", "?"])
    both, one = end_supports(text, subjects["iaaf"])
    assert both == 0 and one >= 0.5
    close, near = unit(0, noise=0.1), unit(0, noise=0.3)     # cosines ~0.995 and ~0.96
    assert float(close @ unit(0)) > 0.98 > float(near @ unit(0)) > 0.875
    plain = Router(store, subjects, lexical_tiers=[(0.7, 0.6)], **args)
    tiered = Router(store, subjects, lexical_tiers=[(0.7, 0.6), (0.5, 0.98, 1)], **args)
    assert plain.route(text, spans, states_for(9, {7: close})) == []
    assert [(r.group_id, r.position) for r in tiered.route(text, spans, states_for(9, {7: close}))] == [("iaaf", 7)]
    assert tiered.route(text, spans, states_for(9, {7: near})) == []
    assert tiered.accepts(text, "iaaf", 0.99) and not tiered.accepts(text, "iaaf", 0.97)
    # no end of the subject spelled: never, whatever the cosine
    other = spans_of(["Когда", "был", "запущен", "конкурс", "по", "плаванию", "?"])
    assert tiered.route(*other, states_for(8, {6: close})) == []
    # without the edge rule the tier's "one end" is plain support: the base tier already fires
    assert [r.group_id for r in Router(store, subjects, edges=False, lexical_tiers=[(0.5, 0.98, 1)], **args)
            .route(text, spans, states_for(9, {7: near}))] == ["iaaf"]


def test_lexical_tier_shapes_are_checked_before_any_compute(tmp_path):
    from lafn_lightning.routing.settings import RoutingSettings
    store = KeyStore(layer=4)
    store.add("g", unit(0)[None])
    for bad in ([(0.5, 0.98, 3)], [(0.5,)], [(0.5, 0.9, 1, 2)]):
        with pytest.raises(ValueError, match="lexical tier"):
            Router(store, {"g": ["x"]}, threshold=1.0001, lexical_threshold=0.8, lexical_tiers=bad)
        with pytest.raises(ValueError, match=r"^routing\.lexical_tiers=.*lexical tier"):
            RoutingSettings(lexical_tiers=[list(t) for t in bad])
    assert RoutingSettings(lexical_tiers=[[0.7, 0.6], [0.5, 0.98, 1]]).lexical_tiers


def test_edges_of_subjects_with_and_without_word_spaces():
    from lafn_lightning.routing.lexical import SubjectGramIndex, edges_spelled

    # a short function word is not an edge; the first and last longer words are
    assert edges_spelled("Wer spielt im Berg des Herrn mit?", "Der Berg des Herrn")
    assert not edges_spelled("when does the good doctor episode 8 air", "Call the Doctor")
    assert not edges_spelled("wanneer wordt de goede dokter uitgezonden", "Bel de dokter")   # "bel": 3 letters, still an edge
    # an edge word must start a query word: "Colda" is not in "beyzbolda", though 60 % of its n-grams are
    baseball = "beyzbolda en çok dünya serisini kim kazandı"
    assert lexical_support(baseball, ["Colda"]) >= 0.5 and not edges_spelled(baseball, "Colda")
    # ... and its n-grams must lie in that one word: "honkbal ... gewonnen" hold half
    # of "Hönne"'s between them, "zelfklevende ... postzegel ... heeft" half of "Zellers"'s
    honkbal = "die de meeste wereldseries in honkbal heeft gewonnen"
    zegel = "wie de allereerste zelfklevende postzegel heeft gemaakt en welk jaar"
    assert lexical_support(honkbal, ["Hönne"]) >= 0.5 and not edges_spelled(honkbal, "Hönne")
    assert lexical_support(zegel, ["Zellers"]) >= 0.5 and not edges_spelled(zegel, "Zellers")
    assert edges_spelled("Waar ligt de Hönnetal?", "Hönne") and edges_spelled("Wie kocht Zellers' winkels?", "Zellers")
    # fewer than two words of 4+ letters: the first and last word, whatever their length
    assert not edges_spelled("when does dragon ball super episode 113 start", ".45 Super")
    assert edges_spelled("Who designed the .45 Super?", ".45 Super")
    # Thai (no word spaces): the first and last characters. "Sunday" alone is not "Runaway Sunday".
    sunday = "ในฟลอริดา การขายเครื่องดื่มแอลกอฮอล์ก่อน 13.00 น. ของวันอาทิตย์ถือเป็นสิ่งผิดกฎหมาย นี่คือ"
    assert lexical_support(sunday, ["วันอาทิตย์หนี"]) > 0.8 and lexical_support(sunday, ["วันอาทิตย์หนี"], edges=True) == 0
    assert edges_spelled("วันอาทิตย์หนีออกฉายเมื่อใด", "วันอาทิตย์หนี")
    # a Thai name written with a space: its first and last words are the edges, so a respelled
    # family name ("โลซิยา" for "โลซิลา") still counts
    assert edges_spelled("แอนโทนี่ โลซิยา อยู่ในสนามเมื่อเล่นฟุตบอลเป็นอย่างไรบ้าง?", "แอนโทนี่ โลซิลา")
    # the n-gram index applies the same rule
    ix = SubjectGramIndex(0.5, edges=True)
    ix.add("runaway", ["วันอาทิตย์หนี"])
    ix.add("doctor", ["Call the Doctor"])
    assert ix.supports(sunday) == {} and set(ix.supports("Who wrote Call the Doctor?")) == {"doctor"}


def test_an_aligned_key_inside_a_word_moves_to_the_word_end_with_its_alias_and_site():
    # The zh prompt spells the subject in Latin letters and its best-aligned token is "Gard" of
    # "Gardner". An earlier rule keyed it there, and the alias "Gard" then fired on "gardien". The key,
    # training's site (routed_subject_span) and the alias now all end with the word, so the
    # router's site on the prompt is still the token training puts ΔV on.
    from lafn_lightning.routing.build import aligned_token, mention_alias

    prompt = "请问 Gardner Inlet 在哪里？"
    pieces = ["请问", " Gard", "ner", " Inlet", " 在哪里", "？"]
    spans, at = [(0, 0)], 0
    for p_ in pieces:
        spans.append((at + (p_[0] == " "), at + len(p_)))
        at += len(p_)
    assert prompt[slice(*spans[2])] == "Gard" and prompt[slice(*spans[3])] == "ner"
    anchors = unit(0)[None]
    states = states_for(len(spans), {2: unit(0)})          # "Gard" matches the anchor best
    assert aligned_token(states, spans, anchors) == 2
    pos = aligned_token(states, spans, anchors, prompt)
    assert pos == 3
    alias = mention_alias(prompt, spans[pos][1], "加德纳海湾")
    assert alias == "Gardner"
    store = KeyStore(layer=4)
    store.add("gardner", states[pos][None], aliases=[alias])
    router = Router(store, {"gardner": ["加德纳海湾"]}, **DEMO_RULE)
    routes = router.route(prompt, spans, states_for(len(spans), {pos: states[pos]}))
    assert [(r.group_id, r.position, r.rule) for r in routes] == [("gardner", pos, "subject")]
    gardien = spans_of(["qui", "est", "le", "meilleur", "gardien", "?"])
    assert router.route(*gardien, states_for(7, {5: unit(0)})) == []            # "Gardner" is not "gardien"
    assert Router(store, {"gardner": ["加德纳海湾"]}, aliases={"gardner": ["Gard"]}, threshold=1.0001,
                  lexical_threshold=0.875, index="flat").route(*gardien, states_for(7, {5: unit(0)}))   # "Gard" was


# --- common subjects --------------------------------------------------------------

def test_background_facts_count_distinct_other_facts_that_spell_the_whole_subject():
    from lafn_lightning.routing.lexical import background_facts
    questions = [(1, "When did Muhammad Ali win a gold medal?"), (1, "Wann gewann Muhammad Ali Gold?"),
                 (2, "Who was Ali Khan?"), (3, "Where is Alicante?"), (4, "In what war did Ali fight?"),
                 (5, "Who directed Marlo Thomas?")]
    counts = background_facts({"ali": ["Ali"], "marlo": ["Marlo Thomas"], "thomas": ["Thomas Rhett"]},
                              questions, own={"ali": 4})
    # facts 1 and 2 (fact 1 twice, in two languages; fact 4 is the group's own; "Alicante" spells
    # no word "ali"); "Thomas" alone is one end of "Thomas Rhett": not the subject
    assert counts == {"ali": 2, "marlo": 1, "thomas": 0}


def test_the_question_index_finds_exactly_the_questions_that_spell_a_subject():
    # The n-gram index only looks candidates up: what it counts must equal the definition,
    # lexical_support(question, forms, edges=True) >= share, over every question.
    from lafn_lightning.data import default_dataset, load_groups
    from lafn_lightning.routing.build import background_fact_questions
    from lafn_lightning.routing.lexical import QuestionGramIndex, background_facts
    groups = load_groups(default_dataset(), select=list(range(0, 150, 10)))   # 12 languages, 4 scripts
    forms = {g.group_id: list(g.subjects) for g in groups}
    questions = list(background_fact_questions()[::400])
    for k, g in enumerate(groups):   # mentions: whole, one word short, respelled ending, in another script's frame
        en, zh, th = g.edits["en"].subject, g.edits["zh"].subject, g.edits["th"].subject
        questions += [(10**6 + k, f"Who made {en}?"), (10**6 + k, f"{zh}是谁的作品？"), (2 * 10**6 + k, f"ใครสร้าง {th}"),
                      (3 * 10**6 + k, f"Where is {en.split()[0]}?"), (4 * 10**6 + k, f"Was ist {en[:-2]}xy?")]
    index = QuestionGramIndex(questions)
    want = {}
    for share in (0.5, 0.7, 1.0):
        want[share] = {gid: len({fact for fact, q in questions if lexical_support(q, fs, edges=True) >= share})
                       for gid, fs in forms.items()}
        assert background_facts(forms, index, share=share) == want[share]
        assert background_facts(forms, questions, share=share) == want[share]
    assert min(want[1.0].values()) >= 1                                      # each "Who made {en}?"
    with pytest.raises(ValueError, match="share > 0"):                            # every question would count
        background_facts(forms, index, share=0.0)
    assert sum(want[0.5].values()) > sum(want[0.7].values()) > sum(want[1.0].values())   # partial mentions count


@pytest.mark.parametrize("lookup", ["index", "lexical"])
def test_a_common_subject_fires_only_where_its_state_agrees(lookup):
    # "Ali" (a cached edit) inside "Muhammad Ali": spelled exactly, but the state at the mention is
    # another person's. Spelled in many other facts' questions, the subject is common: its exact
    # match and its lexical tiers then need the base lexical cosine; a specific subject does not.
    store = axis_store("ali", "lamiinae")
    store.set_common({"ali": 5, "lamiinae": 0})
    subjects = {"ali": ["Ali"], "lamiinae": ["Lamiinae"]}
    args = dict(DEMO_RULE, lexical_tiers=[(0.7, 0.6)], lookup=lookup)
    drift = unit(0, noise=1.0)                       # cosine ~0.7: the lexical tier would accept it
    assert 0.6 < float(drift @ unit(0)) < 0.875
    text, spans = spans_of(["When", "did", "Muhammad", "Ali", "win", "?"])
    lower, lspans = spans_of(["when", "did", "muhammad", "ali", "win", "?"])
    off, on = Router(store, subjects, **args), Router(store, subjects, common_from=3, **args)
    assert [r.stage for r in off.route(text, spans, states_for(7, {4: drift}))] == ["exact"]
    assert [r.stage for r in off.route(lower, lspans, states_for(7, {4: drift}))] == ["state"]
    assert on.is_common("ali") and not on.is_common("lamiinae")
    assert on.route(text, spans, states_for(7, {4: drift})) == []
    assert on.route(lower, lspans, states_for(7, {4: drift})) == []
    assert [(r.group_id, r.position, r.stage) for r in on.route(text, spans, states_for(7, {4: unit(0)}))] == \
        [("ali", 4, "exact")]                        # the edit's own mention still fires
    assert [r.stage for r in on.route(text, spans, None)] == ["exact"]   # stage 1 alone: no state to ask
    assert not on.accepts(lower, "ali", 0.7) and on.accepts(lower, "ali", 0.9)
    # a specific subject keeps its exact match and its tier at the same drifted state
    own, ospans = spans_of(["Which", "family", "does", "Lamiinae", "belong", "to", "?"])
    assert [r.stage for r in on.route(own, ospans, states_for(8, {4: unit(1, noise=1.0)}))] == ["exact"]
    # the count is read from the store (and its file); common_from 0 turns the rule off
    store.common_from = 3
    assert Router(store, subjects, **args).route(text, spans, states_for(7, {4: drift})) == []
    assert Router(store, subjects, common_from=0, **args).route(text, spans, states_for(7, {4: drift}))
    with pytest.raises(ValueError, match="common_from"):
        Router(store, subjects, common_from=-1, **args)


def test_background_fact_counts_survive_the_key_file_a_merge_and_a_refit(tmp_path):
    from lafn_lightning.routing.settings import RoutingSettings
    a = KeyStore(layer=4, common_from=3)
    a.add("g", unit(0)[None])
    a.add("h", unit(1)[None])
    a.set_common({"g": 7, "h": 0, "gone": 2})         # only stored groups get a count
    a = KeyStore.load(a.save(tmp_path / "k.safetensors"))
    assert a.common_from == 3 and a.all_common() == {"g": 7, "h": 0}
    b = KeyStore(layer=4, common_from=3)
    b.add("h", unit(2)[None])                         # a refit without a count replaces it
    assert KeyStore.merge([a, b]).all_common() == {"g": 7}
    assert KeyStore.merge([b, a]).all_common() == {"g": 7, "h": 0} and KeyStore.merge([a, b]).common_from == 3
    a.prune(["h"])
    assert a.all_common() == {"h": 0}
    with pytest.raises(ValueError, match="routing.common_from=3, not routing.common_from=0"):
        KeyStore.merge([a, KeyStore(layer=4)])        # counts for some groups only: refused
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"^routing\.common_from="):
            RoutingSettings(common_from=bad)
