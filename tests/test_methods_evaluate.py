"""`lafn evaluate --method`: every comparison method through the one evaluation, on a tiny model.

Each method is selected by its config's class_path, edits each group alone, is scored by the same
protocol as LU-LAFNs, leaves the backbone's weights unchanged, and resumes from its artifacts."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from conftest import CONFIGS
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.cli import main
from lafn_lightning.methods import stats

TEXTS = {lang: [(f"Who is person number {i}?", f"Someone {i}") for i in range(40)] for lang in ("en", "zh")}
FAST_VALUE = {"v_num_grad_steps": 3}
METHODS = {
    "memit": ("lafn_lightning.methods.memit.MemitMethod",
              {"layers": [1, 2], "prefixes": [[3, 2]], "mom2_update_weight": 10.0, "mom2_n_samples": 40,
               "value": FAST_VALUE}),
    "rome": ("lafn_lightning.methods.rome.RomeMethod",
             {"layer": 1, "prefixes": [[3, 2]], "mom2_n_samples": 40, "value": FAST_VALUE}),
    "lora_ft": ("lafn_lightning.methods.lora_ft.LoraFtMethod", {"lr": 0.01, "max_steps": 15, "stop_loss": None}),
    "remake": ("lafn_lightning.methods.remake.RemakeMethod", {"layer": 1, "threshold": -1.0, "distractors": 5}),
}


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode()), h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture()
def zsre(monkeypatch, tmp_path):
    """Statistics and distractors from a few made-up facts, in a private stats folder."""
    from lafn_lightning.methods import remake

    monkeypatch.setattr(stats, "read_zsre_train", lambda lang, limit=None: TEXTS[lang][:limit])
    monkeypatch.setattr(remake, "read_zsre_train", lambda lang, limit=None: TEXTS[lang][:limit])
    monkeypatch.setenv("LAFN_STATS_DIR", str(tmp_path / "stats"))


def _evaluate(tmp_path, method_file, out):
    main(["evaluate", "-c", str(CONFIGS / "tiny.yaml"), "--data.groups", "0:2", "--method", str(method_file),
          "--cache_dir", str(tmp_path / "cache"), "--output", str(out), "--generation", "false",
          "--trainer.logger", "false"])
    return json.loads(out.read_text(encoding="utf-8"))


def _predictions(out):
    rows = [json.loads(x) for x in out.with_name(out.stem + ".progress.jsonl").read_text().splitlines()[1:]]
    return {(r["group_id"], c[1], c[2], c[3]): c[6] for r in rows for c in r["cells"]}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_is_selected_by_class_path_scored_by_the_protocol_and_resumes(tmp_path, zsre, name):
    class_path, init_args = METHODS[name]
    method_file = tmp_path / f"{name}.yaml"
    method_file.write_text(yaml.safe_dump({"method": {"class_path": class_path, "init_args": init_args}}))
    model, _ = load_backbone("tiny-llama")
    before = _digest(model)

    out = tmp_path / "r.json"
    results = _evaluate(tmp_path, method_file, out)
    assert results["meta"]["method"]["name"] == name and results["meta"]["method"]["class"] == class_path
    assert "all_cached" not in results and set(results["edit_one_test_one"]["reliability"]) >= {"en", "zh"}
    preds = _predictions(out)
    changed = [k for k, v in preds.items() if k[1] == "edit_one_test_one" and k[2] == "reliability"
               and v != preds[(k[0], "pre_edit", k[2], k[3])]]
    assert changed, f"{name}: the edit changed no reliability prediction"
    assert _digest(model) == before                     # weights never change
    stored = sorted(p.name for p in (tmp_path / "cache" / name).rglob("*") if p.is_file())
    assert stored, f"{name}: nothing stored under cache/{name}"

    # resume from the stored artifacts: same predictions, nothing edited again
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / name).rglob("*") if p.is_file()}
    out2 = tmp_path / "again.json"
    _evaluate(tmp_path, method_file, out2)
    assert _predictions(out2) == preds
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_bad_method_config_is_refused_before_compute(tmp_path, capsys):
    cases = [({"method": {"class_path": "lafn_lightning.methods.nothing.Here"}}, "cannot be imported"),
             ({"method": {"class_path": "lafn_lightning.methods.rome.RomeMethod", "init_args": {"layr": 3}}},
              "method.init_args"),
             ({"model": {}}, "needs a 'method:' block")]
    for spec, message in cases:
        path = tmp_path / "m.yaml"
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", "-c", str(CONFIGS / "tiny.yaml"), "--method", str(path), "--output",
                  str(tmp_path / "r.json"), "--cache_dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and str(path) in err, err
    with pytest.raises(SystemExit):
        main(["evaluate", "-c", str(CONFIGS / "tiny.yaml"), "--method", "methods/no-such", "--output",
              str(tmp_path / "r.json"), "--cache_dir", str(tmp_path / "cache")])
    assert "--method methods/no-such: no such config file; shipped configs:" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "cache").exists()


def test_shipped_method_configs_build_their_method_named_alike():
    from lafn_lightning.methods.config import from_config

    names = sorted((CONFIGS / "methods").glob("*.yaml"))
    assert len(names) >= 20
    for path in names:
        name = path.name.split("-", 1)[0]                     # lora_ft-demo.yaml -> lora_ft -> LoraFtMethod
        method = from_config(yaml.safe_load(path.read_text())["method"])
        assert callable(method.edited) and method.name == name, path
        assert type(method).__name__ == "".join(p.capitalize() for p in name.split("_")) + "Method", path


#: class names that method configs and progress files may give, and the class each names
DEPRECATED = {"lafn_lightning.methods.rome.RomeHParams": "lafn_lightning.methods.rome.RomeMethod",
              "lafn_lightning.methods.memit.MemitHParams": "lafn_lightning.methods.memit.MemitMethod",
              "lafn_lightning.methods.pmet.PmetHParams": "lafn_lightning.methods.pmet.PmetMethod",
              "lafn_lightning.methods.lora_ft.LoRAFT": "lafn_lightning.methods.lora_ft.LoraFtMethod",
              "lafn_lightning.methods.lora_ft.LoraFTMethod": "lafn_lightning.methods.lora_ft.LoraFtMethod",
              "lafn_lightning.methods.lora_ft.LoRAFineTune": "lafn_lightning.methods.lora_ft.LoraFtModule",
              "lafn_lightning.methods.remake.ReMaKEMethod": "lafn_lightning.methods.remake.RemakeMethod"}


def test_a_deprecated_class_name_loads_its_class_with_a_warning():
    import importlib

    for old, new in DEPRECATED.items():
        module, _, name = old.rpartition(".")
        with pytest.warns(FutureWarning, match=f"{name} is deprecated: use {new}"):
            cls = getattr(importlib.import_module(module), name)
        assert f"{cls.__module__}.{cls.__qualname__}" == new
    with pytest.raises(AttributeError):
        importlib.import_module("lafn_lightning.methods.rome").NoSuchMethod


def test_an_evaluation_recorded_under_a_deprecated_class_name_resumes(tmp_path, zsre):
    class_path, init_args = METHODS["remake"]
    old = "lafn_lightning.methods.remake.ReMaKEMethod"
    method_file = tmp_path / "remake.yaml"
    method_file.write_text(yaml.safe_dump({"method": {"class_path": old, "init_args": init_args}}))
    out = tmp_path / "r.json"
    with pytest.warns(FutureWarning, match="ReMaKEMethod is deprecated"):
        results = _evaluate(tmp_path, method_file, out)        # a method config naming the old class
    assert results["meta"]["method"]["class"] == class_path
    progress = out.with_name("r.progress.jsonl")              # as an evaluation recorded it under the old name
    lines = progress.read_text().splitlines()
    header = json.loads(lines[0])
    header["header"]["method"]["class"] = old
    progress.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    preds = _predictions(out)
    method_file.write_text(yaml.safe_dump({"method": {"class_path": class_path, "init_args": init_args}}))
    _evaluate(tmp_path, method_file, out)                      # resumes: nothing refused, nothing scored again
    assert _predictions(out) == preds and progress.read_text().splitlines()[1:] == lines[1:]


def test_monolingual_mode_edits_each_language_alone(tmp_path, zsre):
    class_path, init_args = METHODS["rome"]
    method_file = tmp_path / "rome.yaml"
    method_file.write_text(yaml.safe_dump({"method": {"class_path": class_path, "init_args": init_args}}))
    out = tmp_path / "mono.json"
    main(["evaluate", "-c", str(CONFIGS / "tiny.yaml"), "--data.groups", "0:1", "--method", str(method_file),
          "--mode", "monolingual", "--cache_dir", str(tmp_path / "cache"), "--output", str(out),
          "--generation", "false", "--trainer.logger", "false"])
    results = json.loads(out.read_text())
    assert set(results["meta"]["runs"]) == {"en", "zh"}
    for lang in ("en", "zh"):
        records = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "rome" / lang / "artifacts").glob("*.json")]
        assert len(records) == 1 and {r["language"] for r in records[0]["requests"]} == {lang}
