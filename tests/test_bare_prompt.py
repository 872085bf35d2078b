"""``data.bare_prompt``: one of the M prompts per language is the edit question itself, with no prefix."""
import pytest

from conftest import fit
from lafn_lightning import EditCache
from lafn_lightning.cache.store import CacheError
from lafn_lightning.editing.prompts import encode_edit_text


def _rows(cli):
    """Per (group, language): the token ids of its answer rows, padding removed."""
    b, out = cli.datamodule.batch, {}
    for r in range(len(b["group"])):
        ids = b["input_ids"][r][b["attention_mask"][r].bool()].tolist()
        out.setdefault((int(b["group"][r]), int(b["language"][r])), []).append(ids)
    return out


def test_bare_prompt_trains_the_question_itself_in_place_of_one_prefix(tmp_path):
    paper = fit(tmp_path / "paper", "--data.groups", "0:2", "--data.num_prefixes", "3", "--trainer.fast_dev_run", "true")
    bare = fit(tmp_path / "bare", "--data.groups", "0:2", "--data.num_prefixes", "3", "--data.bare_prompt", "true",
               "--trainer.fast_dev_run", "true")
    dm, tok = bare.datamodule, bare.model.tokenizer
    for lang in dm.languages:
        assert bare.datamodule.prefixes[lang][0] == "" and "" not in paper.datamodule.prefixes[lang]
        assert len(dm.prefixes[lang]) == 3 and all(p.strip() for p in dm.prefixes[lang][1:])
    rows, paper_rows = _rows(bare), _rows(paper)
    assert rows.keys() == paper_rows.keys()
    for (k, li), ids in rows.items():
        edit = list(dm.groups[k].edits.values())[li]
        question = encode_edit_text(tok, "", edit.prompt, edit.target, edit.subject, dm.groups[k].subjects).input_ids
        assert len(ids) == 3 == len(paper_rows[k, li])                  # the same number of rows
        assert list(question) in ids and list(question) not in paper_rows[k, li]


def test_bare_prompt_is_recorded_and_a_cache_refuses_the_other_setting(tmp_path):
    fit(tmp_path, "--data.groups", "0:1", "--data.bare_prompt", "true", "--trainer.max_steps", "1")
    assert EditCache.open(tmp_path / "cache").settings["bare_prompt"] is True
    with pytest.raises(CacheError, match="bare_prompt"):
        fit(tmp_path, "--data.groups", "1:2", "--trainer.max_steps", "1")
