"""LoRA-FT on a tiny model: adapter shapes/rank, backbone untouched, artifact apply/remove is exact."""
import json

import lightning as L
import pytest
import torch

from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.data import EditGroup, LanguageEdit
from lafn_lightning.evaluation.metrics import teacher_forced_predictions
from lafn_lightning.methods.lora_ft import EditQuestionsData, LoraFtModule, applied_lora

GROUP = EditGroup("g0", 0, {"en": LanguageEdit("en", "Paris", "Where is the Eiffel tower?", "Rome"),
                            "zh": LanguageEdit("zh", "巴黎", "埃菲尔铁塔在哪里？", "罗马")})
PROBE = ["Where is the Eiffel tower? Rome", "Who wrote Hamlet? Shakespeare"]


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def _logits(model, tok):
    enc = tok(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 steps on the tiny Llama; returns (module, artifact dir, backbone state before)."""
    torch.set_num_threads(1)
    model, _ = load_backbone("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    art = tmp_path_factory.mktemp("lora") / "g0"
    module = LoraFtModule(backbone="tiny-llama", dropout=0.0, lr=1e-2, rank=4, artifact_dir=str(art))
    _trainer(max_steps=30).fit(module, datamodule=EditQuestionsData(edit_groups=[GROUP], backbone="tiny-llama"))
    return module, art, before


def test_fast_dev_run_trains_only_the_ffn_adapters_with_the_stated_rank():
    model, _ = load_backbone("tiny-llama")
    module = LoraFtModule(backbone="tiny-llama", rank=4, layers=[1, 2])
    seen = {}

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen["trainable"] = {n: p.shape for n, p in pl_module.peft.named_parameters() if p.requires_grad}

    _trainer(fast_dev_run=True, callbacks=[Grab()]).fit(
        module, datamodule=EditQuestionsData(edit_groups=[GROUP], backbone="tiny-llama"))
    names = seen["trainable"]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapted = {n.split(".lora_")[0].split("model.layers.")[1] for n in names}
    assert adapted == {"1.mlp.up_proj", "1.mlp.down_proj", "2.mlp.up_proj", "2.mlp.down_proj"}
    state = module.adapter_state            # kept after the adapters left the backbone
    for proj, (out_f, in_f) in {"up_proj": (128, 64), "down_proj": (64, 128)}.items():
        a = state[f"base_model.model.model.layers.1.mlp.{proj}.lora_A.weight"]
        b = state[f"base_model.model.model.layers.1.mlp.{proj}.lora_B.weight"]
        assert a.shape == (4, in_f) and b.shape == (out_f, 4)
        delta = b @ a
        assert 0 < torch.linalg.matrix_rank(delta) <= 4   # one Adam step moved B off zero
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear and not hasattr(model, "peft_config")


def test_backbone_bit_identical_after_training(trained):
    _, _, before = trained
    model, _ = load_backbone("tiny-llama")
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_artifact_applies_the_edit_and_removing_it_restores_logits_exactly(trained):
    _, art, _ = trained
    assert {p.name for p in art.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "edit.json"}
    record = json.loads((art / "edit.json").read_text())
    assert record["groups"] == ["g0"] and record["languages"] == ["en", "zh"]
    assert record["fingerprint"]["edited_layers"] == [0, 1, 2, 3]
    model, tok = load_backbone("tiny-llama")
    ref = _logits(model, tok)
    prompts, targets = [e.prompt for e in GROUP.edits.values()], [e.target for e in GROUP.edits.values()]
    with applied_lora(model, art):
        edited = _logits(model, tok)
        preds = teacher_forced_predictions(model, tok, prompts, targets)
    assert not torch.equal(edited, ref)
    assert all(p == g for p, g in preds)                  # the edit is what the artifact carries
    assert torch.equal(_logits(model, tok), ref)           # removed: exactly the original logits
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_artifact_refused_on_another_backbone(trained):
    _, art, _ = trained
    other, _ = load_backbone("tiny-llama", "bfloat16")
    with pytest.raises(ValueError, match="another backbone"):
        with applied_lora(other, art):
            pass



def test_config_selects_the_method_by_class_path_and_fast_dev_run_writes_an_artifact(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lafn_lightning.data import write_jsonl

    write_jsonl([GROUP], tmp_path / "edits.jsonl")
    config = tmp_path / "lora_ft-fit-tiny.yaml"     # LoraFtModule + EditQuestionsData as plain LightningCLI
    config.write_text("""seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_steps: 70, logger: false, enable_checkpointing: false}
model:
  class_path: lafn_lightning.methods.lora_ft.LoraFtModule
  init_args: {backbone: tiny-llama, dtype: float32, rank: 8, alpha: 32.0, dropout: 0.1, lr: 0.001, stop_loss: 0.01}
data:
  class_path: lafn_lightning.methods.lora_ft.EditQuestionsData
  init_args: {languages: [en, zh], groups: "0:1", backbone: tiny-llama, dtype: float32}
""")
    LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=["fit", "-c", str(config), "--trainer.fast_dev_run", "true",
                       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                       "--data.init_args.dataset", str(tmp_path / "edits.jsonl"),
                       "--model.init_args.artifact_dir", str(tmp_path / "art")],
                 save_config_kwargs={"overwrite": True}, trainer_defaults={"default_root_dir": str(tmp_path)})
    record = json.loads((tmp_path / "art" / "edit.json").read_text())
    assert record["method"] == "lora_ft" and record["groups"] == [GROUP.group_id]
    assert record["hparams"]["rank"] == 8 and record["languages"] == ["en", "zh"]
    model, _ = load_backbone("tiny-llama")
    assert not hasattr(model, "peft_config")          # the adapters left the shared backbone


def test_training_rows_score_exactly_the_answer_tokens_of_the_metrics():
    from lafn_lightning.evaluation.metrics import encode_prompt_targets
    from lafn_lightning.methods.lora_ft import edit_batch

    _, tok = load_backbone("tiny-llama")
    batch = edit_batch(tok, [GROUP])
    encoded = encode_prompt_targets(tok, [e.prompt for e in GROUP.edits.values()], [e.target for e in GROUP.edits.values()])
    for row, enc in enumerate(encoded):
        predicted_at = torch.nonzero(batch["target_mask"][row]).flatten() + 1
        assert predicted_at.tolist() == enc.target_positions
        assert batch["input_ids"][row, : len(enc.input_ids)].tolist() == enc.input_ids
    assert "罗马" == tok.decode(batch["input_ids"][1][batch["target_mask"][1].roll(1)])
