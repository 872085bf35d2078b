"""Edit groups with a weight-editing method and write the artifact (what a ``lafn`` command wraps).

Usage::

    method = from_config(yaml.safe_load(open("configs/methods/memit-demo.yaml"))["method"])
    json_path = edit_groups(method, model, tok, groups, ["en", "zh"], "runs/memit")
    edited = ArtifactModel(model, json_path)          # for evaluation.score_group
"""
from __future__ import annotations

import dataclasses
import time

from .artifact import save_artifact
from .requests import requests_by_language


def edit_groups(method, model, tokenizer, groups, languages=None, out="artifact", *, stats_dir=None, log=print):
    """Build one request per (group, language), run ``method.edit`` and save the artifact; returns
    the artifact's ``.json`` path (its record holds the wall time of the edit)."""
    requests = requests_by_language(groups, languages)
    start = time.time()
    update = method.edit(model, tokenizer, requests, stats_dir=stats_dir, log=log)
    return save_artifact(update, out, model=model, method=method.name, hparams=dataclasses.asdict(method),
                         requests=[r for rs in requests.values() for r in rs],
                         extra={"languages": list(requests), "groups": [g.group_id for g in groups],
                                "edit_seconds": round(time.time() - start, 1)})
