"""End to end on the real demo backbone (Gemma-3-270M): edit MzsRE dev facts in en+zh, apply the cache."""
import pytest
import torch

from conftest import fit
from lafn_lightning import EditCache, EditedModel
from lafn_lightning.data import load_groups
from lafn_lightning.evaluation.metrics import teacher_forced_predictions

pytestmark = pytest.mark.demo


def test_edit_real_facts_and_leave_the_rest_alone(tmp_path, dev_data):
    torch.set_num_threads(2)
    # 80 steps, not the paper's 40: group mzsre:1's zh answer ends 40 steps unconverged (loss
    # about 0.19), where the 25-token accuracy sat at the 0.9 bar (22/25 in one run, passing in
    # others); every group must reach the stop loss here (mzsre:1 at about step 46). fp32: the
    # demo config's dtype "auto" picks bf16 on a CPU with AVX512-BF16, where the same edits reach
    # the stop loss but score 22/25 tokens (mzsre:1 zh: first token "\n" for "沟").
    fit(tmp_path, "--data.groups", "0:3", "--data.languages", "[en, zh]",
        "--trainer.max_steps", "80", "--model.dtype", "float32", config="demo.yaml")
    cache = EditCache.open(tmp_path / "cache")
    assert {g: cache.info(g)["meta"]["converged"] for g in cache} == {f"mzsre:{i}": True for i in range(3)}
    edited = EditedModel.from_cache(tmp_path / "cache", backbone="demo")
    groups = load_groups(dev_data, languages=["en", "zh"], select="0:3")
    prompts = [e.prompt for g in groups for e in g.edits.values()]
    targets = [e.target for g in groups for e in g.edits.values()]

    before = teacher_forced_predictions(edited.model, edited.tokenizer, prompts, targets)
    after = teacher_forced_predictions(edited, edited.tokenizer, prompts, targets)
    hits = sum(p == g for pred, gold in after for p, g in zip(pred, gold))
    total = sum(len(gold) for _, gold in after)
    hits_before = sum(p == g for pred, gold in before for p, g in zip(pred, gold))
    assert hits / total >= 0.9, f"teacher-forced token accuracy {hits}/{total} after editing"
    assert hits_before / total < 0.5  # the new answers were not already predicted

    # An unrelated question (a locality probe) runs the untouched backbone: identical logits.
    loc = [groups[0].edits["en"].locality_prompt, groups[1].edits["zh"].locality_prompt]
    enc = edited.tokenizer(loc, return_tensors="pt", padding=True)
    assert edited.find_sites(enc.input_ids, enc.attention_mask) == []
    assert torch.equal(edited(**enc).logits, edited.model(**enc).logits)
