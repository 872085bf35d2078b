"""The package's architecture and its single rules: layers, light import, one answer-token rule,
one command surface, a cache that records how it was made."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fit
from lafn_lightning.cache import CacheError, EditCache
from lafn_lightning.cli import COMMANDS, NOT_OFFERED, PLAIN, READS, SUMMARIES, _next_hint, main
from lafn_lightning.data import MZSRE_LANGUAGES, default_dataset, load_groups
from lafn_lightning.editing.prompts import encode_edit_text
from lafn_lightning.evaluation.metrics import encode_prompt_targets
from lafn_lightning.inference import EditedModel

PACKAGE = Path(__file__).resolve().parents[1] / "lafn_lightning"
#: import order: a module may import its own layer or a lower one, never a higher one
LAYERS = {"files": 0, "text": 0, "data": 0, "backbone": 0, "cache": 1, "routing": 1, "editing": 2, "callbacks": 3,
          "methods": 5,
          "inference": 4, "evaluation": 5, "api": 6, "cli": 7}


def _imports() -> dict[str, set[str]]:
    """module -> the lafn_lightning modules it imports (relative imports resolved)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                out.add(base)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        graph[name] = {m for m in out if m.split(".")[0] == "lafn_lightning"}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else None
    return LAYERS.get(key)


def test_imports_run_one_way_and_nothing_below_cli_imports_it():
    graph = _imports()
    for module, targets in graph.items():
        for target in targets:
            own, other = _layer(module), _layer(target)
            if own is None or other is None:
                continue
            assert other <= own, f"{module} (layer {own}) imports {target} (layer {other})"
            if not module.startswith("lafn_lightning.cli"):
                assert not target.startswith("lafn_lightning.cli"), f"{module} imports the CLI"


def test_no_import_cycle_between_modules():
    graph = _imports()
    names = set(graph)

    def resolve(target):  # "pkg.module.Name" imports resolve to the module they name
        while target and target not in names:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target

    edges = {m: {resolve(t) for t in ts if resolve(t) and resolve(t) != m} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.endswith("__init__") or nxt == node.rsplit(".", 1)[0]:
                continue
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                pytest.fail("import cycle: " + " -> ".join([*path, nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_import_is_light():
    code = ("import sys, lafn_lightning; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pyarrow', 'matplotlib', 'transformers', 'datasets')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("tokenizer_name", ["tiny", "demo"])
def test_training_and_evaluation_select_the_same_answer_tokens(tokenizer_name):
    """One answer-token rule: on every MzsRE language the tokens L_target trains are the tokens
    the metrics score, a separator-only token (Gemma's lone space before digits) included."""
    if tokenizer_name == "demo":
        from transformers import AutoTokenizer

        from lafn_lightning.backbone.demo import ensure_demo_backbone

        tok = AutoTokenizer.from_pretrained(ensure_demo_backbone(progress=False))
    else:
        from lafn_lightning.backbone.tiny import tiny_tokenizer

        tok = tiny_tokenizer()
    groups = load_groups(default_dataset(), select="0:30")
    separator_only = 0
    for g in groups:
        for lang in MZSRE_LANGUAGES:
            e = g.edits[lang]
            train = encode_edit_text(tok, "", e.prompt, e.target, e.subject, g.subjects)
            score = encode_prompt_targets(tok, [e.prompt], [e.target])[0]
            assert train.input_ids == score.input_ids and train.target_positions == score.target_positions, (g.group_id, lang)
            first = tok.decode([train.input_ids[train.target_positions[0]]])
            separator_only += not first.strip()
    if tokenizer_name == "demo":
        assert separator_only > 0  # the case the rule decides is really there (e.g. answers that are years)


def _options_shown(command: str, capsys) -> set[str]:
    """The options of ``lafn COMMAND --help``."""
    import re

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return set(re.findall(r"^ +(--[\w.]+)", capsys.readouterr().out, re.MULTILINE))


#: the config sections and top-level keys: ``--SECTION`` (a section's config file, or the key's value)
SECTIONS = ("seed_everything", "trainer", "model", "data", "locate", "export", "progress", "cache_dir")


def test_every_command_shows_the_sections_it_reads_and_its_own(capsys):
    own = {"edit-dataset": "--edit_batch_size", "evaluate": "--output", "match-report": "--matchers",
           "plots": "--max_groups", "paraphrase": "--instruct_model", "plan": "--peak_tflops"}
    assert set(own) == set(READS) and set(own) | {"cache", *PLAIN} == set(COMMANDS)
    for command, option in own.items():
        shown = _options_shown(command, capsys)
        assert {option, "--print_config"} <= shown, command
        for section in SECTIONS:
            assert (f"--{section}" in shown) == (section in (READS[command] or SECTIONS)), (command, section)


def test_help_lists_every_command_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert set(SUMMARIES) == {"fit", *COMMANDS}
    for name, summary in SUMMARIES.items():
        assert f"  {name}  " in text and summary in text, name
    for name in NOT_OFFERED:
        assert f"  {name} " not in text


@pytest.mark.parametrize("command", NOT_OFFERED)
def test_lightning_subcommands_are_refused_with_one_line(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "-c", "tiny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"lafn: error: '{command}' is not a lafn command")
    assert err.count("\n") == 1


def test_commands_show_only_the_options_they_read(capsys):
    absent = {"fit": ["--optimizer", "--lr_scheduler"],
              "plots": ["--out", "--beta", "--cache_dir", "--trainer.max_steps", "--seed_everything", "--optimizer"],
              "paraphrase": ["--generate", "--dtype", "--seed", "--model.dtype", "--cache_dir", "--locate.beta"],
              "match-report": ["--cache_dir", "--trainer.max_steps", "--locate.beta", "--progress.every_n_seconds"],
              "plan": ["--cache_dir", "--locate.beta", "--export", "--seed_everything"],
              "evaluate": ["--optimizer", "--lr_scheduler"]}
    for command, options in absent.items():
        if command == "fit":
            with pytest.raises(SystemExit):
                main([command, "--help"])
            text = capsys.readouterr().out
            assert "--data.groups" in text and not any(option in text for option in options)
            continue
        shown = _options_shown(command, capsys)
        assert "--data.groups" in shown
        assert not shown & set(options), (command, shown & set(options))
    assert "--instruct_dtype" in _options_shown("paraphrase", capsys)


#: each renamed option: (command, old, new, value, where the command receives it)
RENAMES = [("plots", "--out", "--output", "runs/p", lambda settings, own: own["output"]),
           ("plots", "--beta", "--locate.beta", "0.25", lambda settings, own: str(settings.locate["beta"])),
           ("paraphrase", "--dtype", "--instruct_dtype", "bfloat16", lambda settings, own: own["instruct_dtype"]),
           ("paraphrase", "--seed", "--seed_everything", "7", lambda settings, own: str(settings["seed_everything"]))]
REQUIRED = {"plots": ["--output", "runs/p"], "paraphrase": ["--instruct_model", "m", "--output", "p.jsonl"]}


def _spy(monkeypatch, command: str) -> list:
    """Replace the API function of ``command`` by one that records its arguments (same signature)."""
    import functools
    import importlib

    module, name = COMMANDS[command].split(":")
    module = importlib.import_module(module)
    calls = []

    @functools.wraps(getattr(module, name))
    def spy(settings, **own):
        calls.append((settings, own))

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("command,old,new,value,received", RENAMES, ids=[f"{r[0]}{r[1]}" for r in RENAMES])
def test_renamed_option_works_and_the_old_name_is_refused_with_one_line(command, old, new, value, received,
                                                                         monkeypatch, capsys):
    calls = _spy(monkeypatch, command)
    main([command, "-c", "tiny", *REQUIRED[command], new, value])
    assert len(calls) == 1 and received(*calls[0]) == value
    capsys.readouterr()
    for arg in ([old, value], [f"{old}={value}"]):
        with pytest.raises(SystemExit) as exit_:
            main([command, "-c", "tiny", *REQUIRED[command], *arg])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(calls) == 1          # refused before the command runs
        assert err.startswith(f"lafn: error: {command} {old}: the option is {new}") and err.count("\n") == 1, err


@pytest.mark.parametrize("command,option", [("plots", "--cache_dir"), ("plots", "--trainer.max_steps"),
                                            ("paraphrase", "--model.dtype"), ("match-report", "--locate.beta")])
def test_an_option_the_command_does_not_read_is_refused_with_one_line(command, option, monkeypatch, capsys):
    calls = _spy(monkeypatch, command)
    with pytest.raises(SystemExit) as exit_:
        main([command, "-c", "tiny", option, "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not calls
    assert err.startswith(f"lafn: error: {command} {option}: {command} does not read ") and err.count("\n") == 1


def test_fit_next_hint_names_the_configs_and_options_used():
    hint = _next_hint(["-c", "demo", "-c", "presets/twelve_languages", "--data.groups", "10:14",
                       "--trainer.max_steps", "3", "--model.layers=[5,6]"], "my cache")
    assert "lafn evaluate -c demo -c presets/twelve_languages --data.groups 10:14 '--model.layers=[5,6]' " \
           "--cache_dir 'my cache' --no_edit true" in hint
    assert "<config>" not in hint and "max_steps" not in hint


def test_backbone_configs_share_the_base_trainer():
    from lafn_lightning.api.settings import Settings

    for name, layers in (("llama3.1-8b", [11, 12, 13, 31]), ("qwen2-7b", [19, 20, 21, 27]),
                         ("bloomz-7b1-mt", [9, 10, 11, 29])):
        settings = Settings.from_config(name)
        assert settings.trainer["max_steps"] == 40 and settings.trainer["enable_checkpointing"] is False
        assert list(settings.model["layers"]) == layers and settings.model["lr"] == 0.5
    twelve = Settings.from_config("demo", "presets/twelve_languages")   # the measured setting, no extra flag
    assert twelve.trainer["max_steps"] == 120 and twelve.data["languages"] is None
    assert list(twelve.model["layers"]) == [10, 11, 12, 13] and twelve.locate["beta"] == 0.1


def test_docs_and_configs_carry_no_development_log():
    import re

    root = PACKAGE.parent
    texts = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "configs").rglob("*.yaml"),
             *(root / "benchmarks").rglob("*.md")]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bsessions?\b|\*s\d+\*", text, re.IGNORECASE), path
    assert len((root / "README.md").read_text(encoding="utf-8").splitlines()) <= 260
    for path in (root / "configs").rglob("*.yaml"):
        head = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        assert len(head) <= 6, path     # a few lines that point to the docs


def test_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["edit-dataset", "-c", "tiny", "--data.groups", "0:3", "--print_config"])
    assert exit_.value.code == 0
    assert "tiny-llama" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", "no-such-config"])
    assert exit_.value.code == 2 and "shipped configs: " in capsys.readouterr().err


def test_cache_records_how_it_was_made_and_from_cache_reads_it(tmp_path):
    fit(tmp_path, "--trainer.max_steps", "2", "--model.site", "activation", "--data.groups", "0:1")
    cache = EditCache.open(tmp_path / "cache")
    record = cache.settings
    assert record["site"] == "activation" and record["backbone"] == "tiny-llama" and record["layers"] == [1, 2]
    assert record["max_steps"] == 2 and record["languages"] == ["en", "zh"] and record["beta"] == 0.1
    edited = EditedModel.from_cache(tmp_path / "cache")                 # backbone and site from the record
    assert edited.site == "activation"
    with pytest.raises(ValueError, match="site='activation'.*site='value'"):
        EditedModel.from_cache(tmp_path / "cache", site="value")
    before = (tmp_path / "cache" / "manifest.json").read_bytes()
    with pytest.raises(CacheError, match="site: cache has 'activation', given 'value'"):
        fit(tmp_path, "--trainer.max_steps", "2", "--data.groups", "1:2")
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == before


def test_version_1_cache_loads_with_the_defaults_of_its_time(tmp_path):
    fit(tmp_path, "--trainer.max_steps", "1", "--data.groups", "0:1")
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["version"], manifest["settings"] = 1, None
    path.write_text(json.dumps(manifest))
    cache = EditCache.open(tmp_path / "cache")
    assert cache.settings == {"site": "value"}
    assert EditedModel.from_cache(tmp_path / "cache", backbone="tiny-llama").site == "value"
    assert torch.is_tensor(cache.entry("mzsre:0").delta)
