"""``model.first_token_weight``: the answer's first token counts more in its row's mean token NLL."""
import pytest
import torch

from conftest import fit
from lafn_lightning import EditCache
from lafn_lightning.cache.store import CacheError


def _reference_row_nll(module, b, weight: float):
    """Per row: the answer tokens' NLL from every position's logits, the first counted ``weight`` times."""
    ids, width = b["input_ids"], b["input_ids"].shape[1]
    logits = module._forward(ids, b["attention_mask"], b["group"], b["subject_pos"], width)
    nll = -logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = b["target_mask"][:, :-1].float()
    first = (m.cumsum(1) == 1) & (m > 0)
    w = m + (weight - 1) * first.float()
    return (nll * w).sum(1) / w.sum(1), -(nll * m).sum(1)


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_the_first_answer_token_is_weighted_in_the_loss_and_stop_rule(tmp_path, weight):
    # two length buckets: the rows run in several forwards, whose tokens are concatenated
    cli = fit(tmp_path, "--data.groups", "0:3", "--model.length_buckets", "2",
              "--model.first_token_weight", str(weight), "--trainer.fast_dev_run", "true")
    module, b = cli.model, cli.datamodule.batch
    assert int(b["target_mask"].sum(1).min()) > 1                 # every answer has a first and a later token
    with torch.no_grad():
        module.delta_v.copy_(torch.randn_like(module.delta_v))
        out = module.losses(b)
        row_nll, logprob = _reference_row_nll(module, b, weight)
        rows = out["rows"]
        ref = torch.stack([row_nll[rows][b["group"][rows] == g].mean() for g in range(3)])
    torch.testing.assert_close(out["row_nll"], row_nll[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["target"], ref, rtol=1e-5, atol=1e-5)           # what the stop rule reads
    torch.testing.assert_close(out["row_logprob"], logprob[rows], rtol=1e-5, atol=1e-5)   # log P(answer): unweighted


def test_the_weight_is_recorded_and_a_cache_refuses_another(tmp_path):
    fit(tmp_path, "--data.groups", "0:1", "--model.first_token_weight", "3", "--trainer.max_steps", "1")
    assert EditCache.open(tmp_path / "cache").settings["first_token_weight"] == 3.0
    with pytest.raises(CacheError, match="first_token_weight"):
        fit(tmp_path, "--data.groups", "1:2", "--trainer.max_steps", "1")


def test_a_weight_below_one_is_refused_with_its_key(tmp_path):
    with pytest.raises(ValueError, match="model.first_token_weight=0.5"):
        fit(tmp_path, "--model.first_token_weight", "0.5", "--trainer.fast_dev_run", "true")
