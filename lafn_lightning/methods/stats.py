"""Per-language second moments C = E[k k^T] of the FFN keys (the input of ``down_proj``; or of ``o_proj``).

Usage::

    C = key_second_moments(model, tok, layers=[6], language="zh", n_samples=2000)[6]   # [d_ff, d_ff]

Text: the first ``n_samples`` zsRE training facts of the language (``question + answer``; never
MzsRE evaluation data); every non-special token position counts. Computed in one forward pass
per batch for all missing layers (stopping after the highest one), cached on disk as safetensors
keyed by the layer's weights + layer + language + sample count + text digest, reused afterwards
(also when the same weights are loaded under another name or path).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..backbone.fingerprint import fingerprint
from ..backbone.ffn import adapter_for
from ..backbone.hooks import Hooks, StopForward, forward_until_stop
from ..data.packaged import read_zsre_train as packaged_zsre_train
from ..editing.prompts import join_prompt_target

def read_zsre_train(language: str, limit: int | None = None) -> list[tuple[str, str]]:
    """The packaged zsRE training facts with an answer (statistics text, never evaluation)."""
    return [(q, a) for q, a in packaged_zsre_train(language, limit=limit) if q]


def default_stats_dir() -> Path:
    return Path(os.environ.get("LAFN_STATS_DIR", Path.home() / ".cache" / "lafn_lightning" / "stats"))


def _key(model, layer: int, language: str, n_samples: int, text_digest: str, module: str = "down") -> dict:
    """What the statistics depend on: the layer's weights (fingerprint without the name the
    backbone was loaded under), the language, the texts, the module whose input is counted."""
    backbone = {k: v for k, v in fingerprint(model, [layer]).items() if k != "name"}
    statistic = "mom2(down_proj input)" if module == "down" else f"mom2({module} input)"
    return {"backbone": backbone, "layer": layer, "language": language,
            "n_samples": n_samples, "texts": text_digest, "statistic": statistic}


def _path(stats_dir: Path, key: dict, name: str) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    tail = f"_L{key['layer']}_{key['language']}_n{key['n_samples']}_{digest}.safetensors"   # digest covers the module
    found = sorted(stats_dir.glob(f"*{tail}")) if stats_dir.is_dir() else []   # made under another name
    return found[0] if found else stats_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-40:] + tail)


def key_second_moments(model, tokenizer, layers: Sequence[int], language: str, *, n_samples: int = 2000,
                       stats_dir: str | Path | None = None, batch_size: int = 32, texts: Sequence[str] | None = None,
                       progress: bool = True, module: str = "down") -> dict[int, torch.Tensor]:
    """``{layer: C}`` with ``C = mean over token positions of k k^T`` (float32, on CPU); ``k`` is
    the input of ``module``: ``down`` (the FFN keys) or ``o_proj`` (the attention heads' output)."""
    stats_dir = Path(stats_dir) if stats_dir is not None else default_stats_dir()
    if texts is None:
        texts = [join_prompt_target(q, a) for q, a in read_zsre_train(language, n_samples)]
    texts = list(texts)[:n_samples]
    text_digest = hashlib.blake2b("\n".join(texts).encode(), digest_size=8).hexdigest()
    out: dict[int, torch.Tensor] = {}
    missing: dict[int, tuple[dict, Path]] = {}
    for layer in sorted(set(int(i) for i in layers)):
        key = _key(model, layer, language, len(texts), text_digest, module)
        path = _path(stats_dir, key, fingerprint(model, [layer])["name"])
        if path.exists():
            out[layer] = load_file(path)["mom2"]
        else:
            missing[layer] = (key, path)
    if missing:
        moments, tokens = _compute(model, tokenizer, sorted(missing), texts, batch_size, progress, language, module)
        for layer, mom2 in moments.items():
            key, path = missing[layer]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"mom2": mom2.contiguous()}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True), "tokens": str(tokens)})
            os.replace(tmp, path)
            out[layer] = mom2
    return out


@torch.no_grad()
def _compute(model, tokenizer, layers, texts, batch_size, progress, language, module) -> dict[int, torch.Tensor]:
    adapter = adapter_for(model)
    sums: dict[int, torch.Tensor] = {}   # [d_in, d_in] per layer, float64
    count = 0
    special = torch.tensor(sorted(set(tokenizer.all_special_ids or [])), dtype=torch.long)
    mask_now: dict[str, torch.Tensor] = {}

    def grab(layer):
        def fn(x):
            k = x[mask_now["m"]].float()   # per-batch product in float32, running sum in float64
            prod = (k.T @ k).to("cpu", torch.float64)
            sums[layer] = sums[layer] + prod if layer in sums else prod
            if layer == layers[-1]:
                raise StopForward
        return fn

    batches = range(0, len(texts), batch_size)
    try:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"key statistics {module} {language} L{layers}", disable=not progress)
    except ImportError:
        pass
    device = next(model.parameters()).device
    with Hooks() as hooks:
        for layer in layers:
            hooks.on_input(adapter.linear_module(model, module, layer), grab(layer))
        for start in batches:
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
            ids = enc["input_ids"].to(device)
            m = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)
            mask_now["m"] = m.to(device)
            count += int(m.sum())
            forward_until_stop(model, input_ids=ids, attention_mask=enc["attention_mask"].to(device), use_cache=False)
    return {layer: (s / max(count, 1)).float() for layer, s in sums.items()}, count
