"""Random-weight backbones with a paper backbone's architecture (speed and memory checks without a checkpoint)."""
import pytest
import torch

from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.backbone.tiny import FULL_SIZE, full_size_model

# parameter counts of the published checkpoints (their model cards / safetensors index)
PUBLISHED = {"llama3.1-8b": 8_030_261_248, "qwen2-7b": 7_615_616_512, "bloomz-7b1-mt": 7_069_016_064}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_models_have_the_published_architecture(name):
    model = full_size_model(name, device="meta")              # shapes only: no memory, no time
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    assert next(model.parameters()).dtype == torch.bfloat16
    bigger = full_size_model(name, vocab_size=262_145, device="meta")   # a tokenizer with more ids
    assert bigger.get_input_embeddings().weight.shape[0] == 262_145


def test_unknown_full_size_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="random-<name> with name in"):
        load_backbone("random-llama-70b")
