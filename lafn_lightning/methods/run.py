"""Edit groups with a weight-editing method and write the artifact (what a ``lafn`` command wraps).

Usage::

    method = from_config(yaml.safe_load(open("configs/methods/memit-demo.yaml"))["method"])
    json_path = edit_groups(method, model, tok, groups, ["en", "zh"], "runs/memit")
    edited = ArtifactModel(model, json_path)          # for evaluation.score_group
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from .artifact import ArtifactModel, load_artifact, save_artifact
from .base import artifact_stem
from .lowrank import LowRankUpdate
from .requests import requests_by_language


def edit_groups(method, model, tokenizer, groups, languages=None, out="artifact", *, stats_dir=None, log=print):
    """Build one request per (group, language), run ``method.edit`` and save the artifact; returns
    the artifact's ``.json`` path (its record holds the wall time of the edit)."""
    requests = requests_by_language(groups, languages)
    start = time.time()
    skip = tokenizer.all_special_ids if getattr(method, "skip_special_tokens", False) else ()
    update = method.edit(model, tokenizer, requests, stats_dir=stats_dir, log=log, update=LowRankUpdate(skip_ids=skip))
    return save_artifact(update, out, model=model, method=method.name, hparams=dataclasses.asdict(method),
                         requests=[r for rs in requests.values() for r in rs],
                         extra={"languages": list(requests), "groups": [g.group_id for g in groups],
                                "edit_seconds": round(time.time() - start, 1)})


@dataclasses.dataclass
class ArtifactEditing:
    """``edited`` of the closed-form methods (M-ROME, M-MEMIT, M-PMET; see :mod:`.base`): the
    artifact of an edit batch lives in ``workdir/artifacts``; one made with the same method and
    hyper-parameters is reused (resume), else the batch is edited and the artifact written.

    ``skip_special_tokens``: the update is not applied at the tokenizer's special tokens (BOS,
    padding), which the key statistics leave out (:class:`.lowrank.LowRankUpdate` ``skip_ids``;
    recorded in the artifact). False: the originals, applied at every position.
    """

    skip_special_tokens: bool = False

    @contextlib.contextmanager
    def edited(self, model, tokenizer, groups, workdir, *, log=print):
        path = Path(workdir) / "artifacts" / artifact_stem(groups)
        json_path = path.with_suffix(".json")
        hparams = json.loads(json.dumps(dataclasses.asdict(self)))
        reuse = False
        if json_path.exists():
            _, record = load_artifact(json_path)
            reuse = record.get("method") == self.name and record.get("hparams") == hparams
        if not reuse:
            json_path = edit_groups(self, model, tokenizer, groups, out=path, log=log)
        yield ArtifactModel(model, json_path)
