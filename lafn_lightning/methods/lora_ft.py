"""LoRA-FT: fine-tune LoRA adapters (PEFT) on the edit questions of every language of an edit batch.

    data = EditQuestionsData(languages=["en", "zh"], groups="0:1", backbone="demo")
    module = LoraFtModule(backbone="demo", artifact_dir="edits/lora/g0")
    L.Trainer(max_steps=70, accelerator="cpu", logger=False).fit(module, datamodule=data)
    with applied_lora(model, "edits/lora/g0"):   # model = load_backbone("demo")[0]
        logits = model(ids).logits                 # edited; on exit the original modules are back

As a method of ``lafn evaluate --method methods/lora_ft-demo`` (:class:`LoraFtMethod`, see
:mod:`lafn_lightning.methods.base`): one fit per edit batch, artifact reused on resume.

Artifact (a folder): PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` and
``edit.json`` (method, groups, languages, hyper-parameters, backbone fingerprint).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..backbone.fingerprint import fingerprint
from ..backbone.loading import load_backbone
from ..data import EditGroup, load_groups, normalize_language
from ..data import default_dataset
from ..backbone.ffn import adapter_for
from ..editing.datamodule import RepeatBatch
from ..evaluation.metrics import encode_prompt_targets
from .base import deprecated_names

ARTIFACT_RECORD = "edit.json"
METHOD = "lora_ft"
#: The FFN up- and down-projection of each FFN family (``adapter_for(model).family``).
FFN_PROJECTIONS = {"gated": ("up_proj", "down_proj"), "bloom": ("dense_h_to_4h", "dense_4h_to_h"),
                   "gpt2": ("c_fc", "c_proj")}


def edit_batch(tokenizer, groups: Sequence[EditGroup]) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` of ``join_prompt_target(question, answer)`` for
    every group and language, and ``target_mask[r, t]``: logits at ``t`` predict an answer token
    (the answer tokens of :func:`lafn_lightning.evaluation.metrics.encode_prompt_targets`)."""
    pairs = [(e.prompt, e.target) for g in groups for e in g.edits.values()]
    encoded = encode_prompt_targets(tokenizer, [p for p, _ in pairs], [t for _, t in pairs])
    width = max(len(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    target_mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, e in enumerate(encoded):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        att[r, : len(e.input_ids)] = 1
        target_mask[r, [t - 1 for t in e.target_positions]] = True
    return {"input_ids": ids, "attention_mask": att, "target_mask": target_mask}


class EditQuestionsData(L.LightningDataModule):
    """The edit questions and new answers of one edit batch, every step the whole batch.

    Args: as :class:`lafn_lightning.editing.datamodule.EditBatchDataModule` (dataset, format, languages,
    groups, backbone, dtype); ``edit_groups`` gives the groups directly (tests, the API).
    """

    def __init__(self, dataset: str | None = None, format: str = "auto", languages: list[str] | None = None,
                 groups: str | list[int] = "0:4", backbone: str = "tiny-llama", dtype: str = "float32",
                 edit_groups: Sequence[EditGroup] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["edit_groups"])
        if edit_groups is not None:
            self.groups = list(edit_groups)
        else:
            self.dataset = dataset or default_dataset()
            langs = [normalize_language(c, where="data.languages") for c in languages] if languages else None
            self.groups = load_groups(self.dataset, format=format, languages=langs, select=groups)
        if not self.groups:
            raise ValueError(f"data.groups={groups!r} selects no record")
        self.batch: dict | None = None

    @property
    def languages(self) -> tuple[str, ...]:
        return self.groups[0].languages

    def setup(self, stage: str | None = None) -> None:
        if self.batch is None:
            _, tokenizer = load_backbone(self.hparams.backbone, self.hparams.dtype)
            self.batch = edit_batch(tokenizer, self.groups)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RepeatBatch(self.batch), batch_size=None, num_workers=0)


def target_regex(model: nn.Module, layers: Sequence[int] | None = None, modules: Sequence[str] | None = None) -> str:
    """PEFT ``target_modules`` regex: ``modules`` (default: the FFN up/down projections) of the
    decoder ``layers`` (default: all)."""
    adapter = adapter_for(model)
    names = list(modules) if modules else list(FFN_PROJECTIONS[adapter.family])
    idx = range(adapter.n_layers) if layers is None else [int(i) for i in layers]
    return (rf"^(.*\.)?{re.escape(adapter.layers_path)}\.({'|'.join(str(i) for i in idx)})\."
            rf"(.*\.)?({'|'.join(re.escape(n) for n in names)})$")


class LoraFtModule(L.LightningModule):
    """LoRA on the FFN up/down projections (EasyEdit's LoRA: rank 8, alpha 32, dropout 0.1,
    lr 5e-3, Adam, loss on the answer tokens only). The only trainable parameters are the adapters;
    they are injected into the shared backbone at ``setup`` and removed at ``teardown`` (the
    backbone's own modules come back unchanged); ``artifact_dir`` receives the artifact at fit end.

    Args:
        layers: decoder layers that get adapters (default: all, as EasyEdit's ``layers: []``).
        target_modules: module names to adapt (default: the FFN up/down projections; EasyEdit's
            published hparams use ``[q_proj, v_proj]``).
        stop_loss: stop the fit once the answer loss of a step is below this (default: run
            ``trainer.max_steps``, as EasyEdit's ``num_steps``).
    """

    def __init__(self, backbone: str = "tiny-llama", dtype: str = "float32", layers: list[int] | None = None,
                 target_modules: list[str] | None = None, rank: int = 8, alpha: float = 32.0,
                 dropout: float = 0.1, lr: float = 5e-3, weight_decay: float = 0.0, seed: int = 0,
                 stop_loss: float | None = None, artifact_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.given: tuple[nn.Module, object] | None = None  # (model, tokenizer) already loaded, instead of ``backbone``
        self.artifact_extra: dict = {}                       # more fields for the artifact's record
        self.peft: nn.Module | None = None
        self.adapter_state: dict[str, torch.Tensor] = {}

    # ---- adapters in and out of the shared backbone
    def setup(self, stage: str) -> None:
        if self.peft is not None:
            return
        from peft import LoraConfig, get_peft_model

        model, _ = self.given or load_backbone(self.hparams.backbone, self.hparams.dtype)
        if hasattr(model, "peft_config"):
            raise RuntimeError("the backbone already carries PEFT adapters (an artifact still applied?)")
        hp = self.hparams
        config = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none",
                            task_type="CAUSAL_LM", target_modules=target_regex(model, hp.layers, hp.target_modules))
        layers = list(range(adapter_for(model).n_layers)) if hp.layers is None else list(hp.layers)
        self.fingerprint = fingerprint(model, layers)  # of the backbone without adapters
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.peft = get_peft_model(model, config)

    def teardown(self, stage: str) -> None:
        self.release()

    def release(self) -> None:
        """Remove the adapters from the backbone (the original modules come back)."""
        if self.peft is not None:
            self.adapter_state = self.lora_state()
            _unload(self.peft)
            self.peft = None

    def lora_state(self) -> dict[str, torch.Tensor]:
        if self.peft is None:
            return dict(self.adapter_state)
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    # ---- training
    def configure_optimizers(self):
        params = [p for p in self.peft.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def training_step(self, batch: dict, batch_idx: int):
        ids, att, mask = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        keep = torch.nonzero(mask.any(0)).flatten()
        logits = self.peft(input_ids=ids, attention_mask=att, use_cache=False, logits_to_keep=keep).logits
        if logits.shape[1] != keep.numel():  # a model that ignores logits_to_keep
            logits = logits[:, keep]
        labels = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)[:, keep]
        sel = mask[:, keep]
        loss = F.cross_entropy(logits[sel].float(), labels[sel])
        with torch.no_grad():
            acc = (logits[sel].argmax(-1) == labels[sel]).float().mean()
        self.log_dict({"loss": loss, "answer_token_acc": acc}, prog_bar=True)
        if self.hparams.stop_loss is not None and loss.item() < self.hparams.stop_loss:
            self.trainer.should_stop = True
        self.steps_run = batch_idx + 1
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}

    def on_fit_end(self) -> None:
        if self.hparams.artifact_dir and self.trainer.is_global_zero:
            dm = self.trainer.datamodule
            groups = [g.group_id for g in dm.groups] if dm is not None else []
            languages = list(dm.languages) if dm is not None else []
            self.save_artifact(self.hparams.artifact_dir, groups=groups, languages=languages,
                               extra={**self.artifact_extra, "steps_run": getattr(self, "steps_run", 0)})

    def save_artifact(self, path: str | Path, *, groups: Sequence[str] = (), languages: Sequence[str] = (),
                      extra: dict | None = None) -> Path:
        """Write the adapter (safetensors + adapter_config.json) and ``edit.json``, atomically."""
        from peft import __version__ as peft_version

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.peft.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        record = {"method": METHOD, "format": 1, "groups": list(groups), "languages": list(languages),
                  "hparams": {**{k: v for k, v in dict(self.hparams).items() if k != "artifact_dir"},
                              **{k: v for k, v in (extra or {}).items() if k == "max_steps"}},
                  **{k: v for k, v in (extra or {}).items() if k != "max_steps"},
                  "peft_version": peft_version,
                  "fingerprint": self.fingerprint}
        (tmp / ARTIFACT_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path


def _unload(peft_model: nn.Module) -> nn.Module:
    base = peft_model.unload()  # replaces every LoRA layer by its original module
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def read_artifact(path: str | Path) -> dict:
    record = json.loads((Path(path) / ARTIFACT_RECORD).read_text(encoding="utf-8"))
    if record.get("method") != METHOD:
        raise ValueError(f"{path}: not a {METHOD} artifact (method {record.get('method')!r})")
    return record


def check_fingerprint(model: nn.Module, record: dict, path: str | Path = "") -> None:
    """Refuse an artifact trained on another backbone (sizes, dtype or layer weights differ)."""
    want = record["fingerprint"]
    got = fingerprint(model, want["edited_layers"])
    diff = [k for k in ("architecture", "n_layers", "d_ff", "dtype", "layers_hash") if got.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"{path}: the artifact was trained on another backbone ({', '.join(diff)} differ: "
                         f"artifact {[want.get(k) for k in diff]}, this backbone {[got.get(k) for k in diff]})")


@contextlib.contextmanager
def applied_lora(model: nn.Module, path: str | Path, *, check: bool = True) -> Iterator[nn.Module]:
    """Apply a LoRA-FT artifact to ``model`` in place for the ``with`` block (``model(...)`` is then
    the edited model; the PeftModel is yielded); on exit the adapters are unloaded and ``model``
    computes exactly what it did before."""
    from peft import PeftModel

    if check:
        check_fingerprint(model, read_artifact(path), path)
    if hasattr(model, "peft_config"):
        raise RuntimeError("the backbone already carries PEFT adapters")
    peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    try:
        yield peft_model
    finally:
        _unload(peft_model)


class AdapterModel(nn.Module):
    """The backbone with LoRA adapters injected but enabled only during this module's own calls,
    so the plain backbone beside it computes exactly what it did (the reference of Locality)."""

    def __init__(self, backbone: nn.Module, peft_model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.lora = backbone, peft_model.base_model
        self.lora.disable_adapter_layers()

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    @contextlib.contextmanager
    def _enabled(self):
        self.lora.enable_adapter_layers()
        try:
            yield
        finally:
            self.lora.disable_adapter_layers()

    def forward(self, *args, **kwargs):
        with self._enabled():
            return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._enabled():
            return self.backbone.generate(*args, **kwargs)


@dataclass
class LoraFtMethod:
    """LoRA-FT as a method of ``lafn evaluate --method`` (one fit of :class:`LoraFtModule` per edit
    batch, on its edit questions in every language; see :mod:`lafn_lightning.methods.base`).

    Args: as :class:`LoraFtModule`, plus ``max_steps`` (EasyEdit's ``num_steps``: 70)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    layers: list[int] | None = None
    target_modules: list[str] | None = None
    max_steps: int = 70
    stop_loss: float | None = 0.01
    seed: int = 0

    name = METHOD

    def _reusable(self, path: Path) -> bool:
        if not (path / ARTIFACT_RECORD).exists():
            return False
        hp = read_artifact(path)["hparams"]
        return all(hp.get(k) == v for k, v in json.loads(json.dumps(asdict(self))).items() if k != "max_steps") \
            and hp.get("max_steps", self.max_steps) == self.max_steps

    @contextlib.contextmanager
    def edited(self, model, tokenizer, groups, workdir, *, log=print):
        from .base import artifact_stem

        path = Path(workdir) / "artifacts" / artifact_stem(groups)
        if not self._reusable(path):
            args = {k: v for k, v in asdict(self).items() if k != "max_steps"}
            module = LoraFtModule(**args, artifact_dir=str(path))
            module.given, module.artifact_extra = (model, tokenizer), {"max_steps": self.max_steps}
            data = EditQuestionsData(edit_groups=groups)
            data.batch = edit_batch(tokenizer, groups)
            training = model.training
            L.Trainer(max_steps=self.max_steps, accelerator="auto", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
                module, datamodule=data)   # on_fit_end writes the artifact
            model.train(training)
        with applied_lora(model, path) as peft_model:
            yield AdapterModel(model, peft_model)


#: deprecated class names that method configs and evaluation progress files may give
__getattr__ = deprecated_names(__name__, {"LoRAFT": "LoraFtMethod", "LoraFTMethod": "LoraFtMethod",
                                          "LoRAFineTune": "LoraFtModule"})   # a LightningCLI model class_path
