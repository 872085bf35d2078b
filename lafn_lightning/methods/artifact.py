"""Edit artifacts: a weight-editing method's update on disk, applied at load by forward hooks.

Usage::

    save_artifact(update, "runs/memit", model=model, method="memit", hparams=asdict(hp))
    handle = apply_artifact(model, "runs/memit")     # down_proj(x) += (x @ left^T) @ right
    ...                                              # evaluate the edited model
    handle.remove()                                  # the backbone again, bit for bit

Files: ``<path>.safetensors`` (``layers.<i>.left`` [r, d_ff], ``layers.<i>.right`` [r, d_model],
float32; delta W = right^T @ left of down_proj; ``o_proj.<i>.left/right`` of the attention output
projection where a method writes it) and ``<path>.json`` (method, hyper-parameters, requests,
ranks, backbone fingerprint, the token ids the update skips). The backbone's weights are never written; applying an artifact
to a backbone whose edited layers differ from the fingerprint is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..backbone.fingerprint import fingerprint
from .lowrank import LowRankUpdate

FORMAT = "lafn-weight-edit/1"
_PREFIX = {"down": "layers"}   # tensor-name prefix per module (down_proj: the format's first names)


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_artifact(update: LowRankUpdate, path, *, model, method: str, hparams: dict | None = None,
                  requests=None, extra: dict | None = None) -> Path:
    """Write the two files atomically; return the ``.json`` path."""
    tensors_path, record_path = _paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for (module, layer), (left, right) in sorted(update.parts.items()):
        name = _PREFIX.get(module, module) + f".{layer}"
        tensors[f"{name}.left"], tensors[f"{name}.right"] = left.contiguous(), right.contiguous()
        ranks[str(layer) if module == "down" else name] = int(left.shape[0])
    record = {
        "format": FORMAT, "method": method, "hparams": hparams or {},
        "layers": update.layers, "ranks": ranks,
        "fingerprint": fingerprint(model, update.layers),
        "skip_token_ids": list(update.skip_ids),
        "requests": [r.as_dict() if hasattr(r, "as_dict") else r for r in (requests or [])],
        **(extra or {}),
    }
    tmp = tensors_path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": method})
    os.replace(tmp, tensors_path)
    tmp = record_path.with_suffix(".jsontmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, record_path)
    return record_path


def load_artifact(path) -> tuple[LowRankUpdate, dict]:
    tensors_path, record_path = _paths(path)
    record = json.loads(record_path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{record_path}: not a {FORMAT} artifact (format {record.get('format')!r})")
    tensors = load_file(str(tensors_path))
    update = LowRankUpdate(skip_ids=record.get("skip_token_ids", ()))
    modules = {v: k for k, v in _PREFIX.items()}
    for name in sorted(k[: -len(".left")] for k in tensors if k.endswith(".left")):
        prefix, layer = name.rsplit(".", 1)
        update.add(int(layer), tensors[f"{name}.left"], tensors[f"{name}.right"], modules.get(prefix, prefix))
    return update, record


def apply_artifact(model, path):
    """Attach the artifact's update to ``model``; returns a handle with ``.remove()``, ``.record``."""
    update, record = load_artifact(path)
    have = fingerprint(model, update.layers)
    want = record["fingerprint"]
    for key in ("architecture", "n_layers", "d_ff", "layers_hash"):
        if have.get(key) != want.get(key):
            raise ValueError(f"artifact {path} was made for another backbone: {key} is {have.get(key)!r} here, "
                             f"{want.get(key)!r} in the artifact ({want.get('name')})")
    handle = update.hooks(model)
    handle.record = record
    handle.update = update
    return handle


class ArtifactModel(nn.Module):
    """The backbone with an artifact attached only during its own calls, so the plain backbone
    stays usable beside it (the unedited reference of Locality). Drop-in for an ``EditedModel``
    in :func:`lafn_lightning.evaluation.protocol.score_group`::

        edited = ArtifactModel(model, "runs/memit")
        cells = score_group(model, tok, group, {"edit_one_test_one": edited})
    """

    def __init__(self, backbone: nn.Module, path) -> None:
        super().__init__()
        handle = apply_artifact(backbone, path)   # checks the fingerprint
        handle.remove()
        self.backbone, self.update, self.record = backbone, handle.update, handle.record

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def forward(self, *args, **kwargs):
        with self.update.applied(self.backbone):
            return self.backbone(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.update.applied(self.backbone):
            return self.backbone.generate(*args, **kwargs)
