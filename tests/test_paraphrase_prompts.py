"""``data.paraphrase_prompts``: the question's paraphrases as further training prompts."""
import json

import pytest

from conftest import CONFIGS, fit
from lafn_lightning import EditCache
from lafn_lightning.cache.store import CacheError
from lafn_lightning.editing.prompts import encode_edit_text

PARAPHRASES = {
    ("mzsre:0", "en"): ["In which year did IAAF Combined Events Challenge begin?", "When did it start?",
                        "IAAF Combined Events Challenge was founded in which year?"],
    ("mzsre:0", "zh"): ["IAAF综合项目挑战赛是哪一年创立的？"],
    ("mzsre:1", "en"): ["Ramalinaceae is part of which family?"],
}


def _paraphrase_file(tmp_path):
    path = tmp_path / "paraphrases.jsonl"
    path.write_text("\n".join(json.dumps({"group_id": g, "language": lang, "paraphrases": p})
                              for (g, lang), p in PARAPHRASES.items()), encoding="utf-8")
    return str(path)


def _rows(cli):
    """Per (group, language): (token ids, subject position) of its answer rows, padding removed."""
    b, out = cli.datamodule.batch, {}
    for r in range(len(b["group"])):
        keep = b["attention_mask"][r].bool()
        pad = int((~keep).sum())
        out.setdefault((int(b["group"][r]), int(b["language"][r])), []).append(
            (b["input_ids"][r][keep].tolist(), int(b["subject_pos"][r]) - pad))
    return out


def test_the_first_paraphrases_become_answer_rows_after_the_prefixed_prompts(tmp_path):
    paras = _paraphrase_file(tmp_path)
    cli = fit(tmp_path / "p", "--data.paraphrases", paras, "--data.paraphrase_prompts", "2",
              "--data.num_prefixes", "2", "--trainer.fast_dev_run", "true")
    plain = fit(tmp_path / "plain", "--data.paraphrases", paras, "--data.num_prefixes", "2",
                "--trainer.fast_dev_run", "true")
    dm, tok = cli.datamodule, cli.model.tokenizer
    rows, plain_rows = _rows(cli), _rows(plain)
    assert rows.keys() == plain_rows.keys()
    for (k, li), got in rows.items():
        group = dm.groups[k]
        lang, edit = list(group.edits.items())[li]
        expected = PARAPHRASES.get((group.group_id, lang), [])[:2]
        assert len(plain_rows[k, li]) == 2                      # 0 (default): paraphrases only locate
        assert got[:2] == plain_rows[k, li]                     # the prefixed prompts first, unchanged
        assert len(got) == 2 + len(expected)
        for (ids, subject_pos), question in zip(got[2:], expected):
            enc = encode_edit_text(tok, "", question, edit.target, edit.subject, group.subjects)
            assert ids == enc.input_ids and subject_pos == enc.subject_pos
    # the subject rules are counted for the edit questions only
    assert all(sum(dm.rule_counts[lang].values()) == len(dm.groups) for lang in dm.languages)


def test_paraphrase_prompts_are_recorded_and_a_cache_refuses_the_other_setting(tmp_path):
    paras = _paraphrase_file(tmp_path)
    fit(tmp_path, "--data.groups", "0:1", "--data.paraphrases", paras, "--data.paraphrase_prompts", "1",
        "--trainer.max_steps", "1")
    assert EditCache.open(tmp_path / "cache").settings["paraphrase_prompts"] == 1
    with pytest.raises(CacheError, match="paraphrase_prompts"):
        fit(tmp_path, "--data.groups", "1:2", "--data.paraphrases", paras, "--trainer.max_steps", "1")


@pytest.mark.parametrize("extra, message", [(["--data.paraphrase_prompts", "2"], "needs|give them with data.paraphrases"),
                                            (["--data.paraphrase_prompts", "-1"], "data.paraphrase_prompts=-1")])
def test_paraphrase_prompts_without_paraphrases_are_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, *extra, "--trainer.fast_dev_run", "true")


def test_plan_counts_the_paraphrase_rows(tmp_path):
    """``lafn plan`` sizes the rows a fit will run: the paraphrase prompts are among them."""
    from lafn_lightning.api.plan import group_shape
    from lafn_lightning.backbone.loading import load_backbone
    from lafn_lightning.data.records import attach_paraphrases, read_mzsre
    from lafn_lightning.data import default_dataset

    _, tok = load_backbone("tiny-llama")
    groups = attach_paraphrases(read_mzsre(default_dataset(), languages=["en", "zh"], select=":2"),
                                _paraphrase_file(tmp_path))
    base = group_shape(groups, tok, 2, 3)
    assert group_shape(groups, tok, 2, 3, paraphrase_prompts=2).rows == base.rows + 2 + 1 + 1
    assert group_shape(groups, tok, 2, 3, paraphrase_prompts=9).rows == base.rows + 3 + 1 + 1


def test_the_paraphrase_preset_trains_on_the_question_and_its_first_paraphrase(tmp_path):
    """``-c presets/paraphrase_prompts``: per language the bare question, then its first paraphrase
    (none where the file has none), with L-BFGS; recorded in the cache; refused without a file."""
    preset = str(CONFIGS / "presets" / "paraphrase_prompts.yaml")
    cli = fit(tmp_path, "-c", preset, "--data.paraphrases", _paraphrase_file(tmp_path), "--trainer.max_steps", "1")
    dm, tok = cli.datamodule, cli.model.tokenizer
    for (k, li), got in _rows(cli).items():
        group = dm.groups[k]
        lang, edit = list(group.edits.items())[li]
        questions = [edit.prompt, *PARAPHRASES.get((group.group_id, lang), [])[:1]]
        assert got == [(e.input_ids, e.subject_pos) for e in
                       (encode_edit_text(tok, "", q, edit.target, edit.subject, group.subjects) for q in questions)]
    settings = EditCache.open(tmp_path / "cache").settings
    assert (settings["optimizer"], settings["bare_prompt"], settings["num_prefixes"], settings["paraphrase_prompts"]) \
        == ("lbfgs", True, 1, 1)
    with pytest.raises(ValueError, match="data.paraphrases"):
        fit(tmp_path / "none", "-c", preset, "--trainer.fast_dev_run", "true")
