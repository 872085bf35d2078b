"""Router keys in the edit cache: built by `lafn fit`, pruned by `lafn cache delete`, merged by
`lafn cache merge`, read by `matcher="router"` and `lafn match-report --matchers router`."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, fit
from lafn_lightning.cli import main
from lafn_lightning.inference import EditedModel
from lafn_lightning.routing.build import background_fact_questions, group_aliases, group_keys
from lafn_lightning.routing.lexical import background_facts
from lafn_lightning.routing.keys import KEYS_FILE, KeyStore

THRESHOLDS = ("--routing.threshold", "0.95", "--routing.lexical_threshold", "0.5",
              "--routing.lexical_tiers", "[[0.7, 0.4]]", "--routing.common_from", "1")


def _fit(tmp_path, name, groups):
    return fit(tmp_path / name, "--data.groups", groups, "--trainer.max_steps", "2", *THRESHOLDS)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router_wiring")
    torch.set_num_threads(1)
    a = _fit(tmp, "a", "0:2")
    b = _fit(tmp, "b", "2:3")
    return tmp, a, b


def test_fit_stores_each_exported_group_keys_with_the_thresholds(caches):
    tmp, cli, _ = caches
    store = KeyStore.load(tmp / "a" / "cache" / KEYS_FILE)
    assert store.group_ids() == ["mzsre:0", "mzsre:1"]
    assert store.layer == min(cli.model.layers) and (store.threshold, store.lexical_threshold) == (0.95, 0.5)
    assert store.lexical_tiers == [[0.7, 0.4]] and store.common_from == 1
    forms = {g.group_id: list(g.subjects) + store.aliases(g.group_id) for g in cli.datamodule.groups}
    assert store.all_common() == background_facts(forms, background_fact_questions())   # counted at export
    model, tok = cli.model.backbone, cli.model.tokenizer
    for group in cli.datamodule.groups:   # the stored keys are the group's own (anchors + edit prompts)
        want, sites = group_keys(model, tok, store, group)
        assert torch.allclose(store.keys(group.group_id).float(), want / want.norm(dim=-1, keepdim=True), atol=2e-3)
        assert store.aliases(group.group_id) == group_aliases(tok, group, sites)
    routed = EditedModel.from_cache(tmp / "a" / "cache", matcher="router")
    assert set(routed.router._group_rows) == {"mzsre:0", "mzsre:1"} and routed.router.threshold == 0.95
    assert routed.router.lexical_tiers == ((0.5, 0.5, 2), (0.7, 0.4, 2)) and routed.router.common_from == 1


def test_cache_merge_merges_keys_and_delete_prunes_them(caches, tmp_path):
    tmp, _, _ = caches
    dest = tmp_path / "merged"
    main(["cache", "merge", str(dest), str(tmp / "a" / "cache"), str(tmp / "b" / "cache")])
    merged = KeyStore.load(dest / KEYS_FILE)
    assert sorted(merged.group_ids()) == ["mzsre:0", "mzsre:1", "mzsre:2"]
    a = KeyStore.load(tmp / "a" / "cache" / KEYS_FILE)
    assert torch.equal(merged.keys("mzsre:1"), a.keys("mzsre:1"))

    main(["cache", "delete", str(dest), "mzsre:1"])
    assert sorted(KeyStore.load(dest / KEYS_FILE).group_ids()) == ["mzsre:0", "mzsre:2"]
    routed = EditedModel.from_cache(dest, matcher="router")
    assert "mzsre:1" not in routed.router and "mzsre:2" in routed.router


def test_match_report_compares_the_router_with_the_string_matchers(tmp_path, capsys):
    out = tmp_path / "coverage.json"
    main(["match-report", "-c", str(CONFIGS / "tiny.yaml"), "--data.groups", "0:6", "--data.languages", "[en, ru, th]",
          "--matchers", "[exact, router]", *THRESHOLDS, "--routing.common_from", "0", "--output", str(out)])
    report = json.loads(out.read_text())
    assert set(report) == {"exact", "router"}
    for lang in ("en", "ru", "th"):   # stage 1 is the exact matcher (no common-subject rule): the router finds at least as much
        assert report["router"][lang]["found"] >= report["exact"][lang]["found"]
    assert "router" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        main(["match-report", "-c", str(CONFIGS / "tiny.yaml"), "--matchers", "[router]"])
    assert exc.value.code == 2 and "routing.threshold is not set" in capsys.readouterr().err


def test_routed_subject_site_puts_the_delta_where_the_router_fires(tmp_path):
    """The ru question spells the subject differently ("Moskva" for "Москва"): the paper's rule
    puts ΔV on its last token; `data.subject_site routed` on the token whose state the router keys."""
    from lafn_lightning.api.settings import Settings
    from lafn_lightning.routing.build import background_questions, new_store

    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps({"id": "moscow", "edits": {
        "en": {"subject": "Moscow", "prompt": "Where is Moscow located?", "target": "Russia"},
        "ru": {"subject": "Москва", "prompt": "Где находится Moskva сейчас?", "target": "Россия"}}}) + "\n")
    sites = {}
    for rule in ("fallback", "routed"):
        settings = Settings.from_config(CONFIGS / "tiny.yaml", overrides={
            "data.dataset": str(data), "data.format": "jsonl", "data.languages": ["en", "ru"], "data.groups": None,
            "data.num_prefixes": 0, "data.subject_site": rule})
        record = settings.record(["en", "ru"])   # a cache records a non-default site rule
        assert record.get("subject_site") == (None if rule == "fallback" else "routed")
        _, module, dm = settings.instantiate()
        dm.setup("fit")
        ru = (dm.batch["language"] == 1).nonzero()[0, 0]
        ids = dm.batch["input_ids"][ru][dm.batch["attention_mask"][ru].bool()].tolist()
        sites[rule] = (int(dm.batch["subject_pos"][ru]) - (len(dm.batch["input_ids"][ru]) - len(ids)),
                       dict(dm.rule_counts["ru"]))
    model, tok = module.backbone, module.tokenizer
    store = new_store(model, tok, 1, background_questions())
    _, key_sites = group_keys(model, tok, store, dm.groups[0])
    question_tokens = len(tok("Где находится Moskva сейчас?")["input_ids"])
    assert sites["fallback"][1]["fallback"] == 1 and sites["routed"][1]["aligned"] == 1
    assert key_sites[1][2] == "aligned" and sites["routed"][0] == key_sites[1][1]   # where the router keys it
    assert sites["fallback"][0] >= question_tokens - 2
    # the aligned token is moved to the end of its word (the tiny tokenizer splits every byte), so
    # the key, the site and an alias all end where a mention of that word ends
    from lafn_lightning.routing.build import word_end
    from lafn_lightning.routing.states import encode_with_offsets
    ru_q = "Где находится Moskva сейчас?"
    end = encode_with_offsets(tok, ru_q)[1][sites["routed"][0]][1]
    assert word_end(ru_q, end) == end and ru_q[end - 1].isalpha()


def test_a_cache_without_keys_says_how_to_get_them(tmp_path):
    cli = fit(tmp_path, "--data.groups", "0:1", "--trainer.max_steps", "1", "--routing.keys", "false")
    cache = tmp_path / "cache"
    assert (cache / "manifest.json").exists() and not (cache / KEYS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no router key file .*routing.keys"):
        EditedModel(cli.model.backbone, cli.model.tokenizer, cache, matcher="router")
