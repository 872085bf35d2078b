"""The ``routing`` config section: recorded beside the router keys by `lafn fit`, read back by
`KeyStore.load(...).routing`, the routed model and `lafn evaluate --matcher router`; key settings
that differ from a cache's keys are refused; the old ``export.router_*`` names are refused."""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import CONFIGS, fit
from lafn_lightning.cli import main
from lafn_lightning.inference import EditedModel
from lafn_lightning.inference.routed_model import RoutedEditedModel
from lafn_lightning.routing.keys import KEYS_FILE, KeyStore
from lafn_lightning.routing.settings import RENAMED, RoutingSettings

TINY = str(CONFIGS / "tiny.yaml")
#: non-default settings (tiny.yaml sets none)
GIVEN = RoutingSettings(threshold=0.95, lexical_threshold=0.5, lexical_tiers=[[0.7, 0.4]], common_from=1)
ROUTING = ("--routing.threshold", "0.95", "--routing.lexical_threshold", "0.5",
           "--routing.lexical_tiers", "[[0.7, 0.4]]", "--routing.common_from", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny cache fitted with :data:`GIVEN`; returns (folder, the fit's LightningCLI)."""
    tmp = tmp_path_factory.mktemp("routing_settings")
    torch.set_num_threads(1)
    return tmp, fit(tmp, "--data.groups", "0:2", "--trainer.max_steps", "2", *ROUTING)


def _no_backbone(monkeypatch) -> None:
    """Make loading the edit module (the backbone) fail the test: a refusal must come before it."""
    from lafn_lightning.editing.module import LafnEditModule

    @functools.wraps(LafnEditModule.__init__)   # the parser still reads its signature
    def loaded(*args, **kwargs):
        pytest.fail("the backbone was loaded")

    monkeypatch.setattr(LafnEditModule, "__init__", loaded)


def _one_line_exit_2(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_fit_records_the_routing_section_beside_the_keys_and_loading_reads_it_back(built):
    tmp, cli = built
    want = RoutingSettings(**{**vars(GIVEN), "layer": min(cli.model.layers)})
    path = tmp / "cache" / KEYS_FILE
    assert KeyStore.load(path).routing == want and KeyStore.read_routing(path) == want
    with safe_open(str(path), framework="pt") as f:   # one versioned record
        record = json.loads(f.metadata()["routing"])
    assert record.pop("version") == 1 and RoutingSettings(**record) == want
    routed = EditedModel.from_cache(tmp / "cache", matcher="router")   # nothing passed again
    assert routed.routing == want
    assert (routed.router.threshold, routed.router.common_from) == (0.95, 1)
    assert routed.router.lexical_tiers == ((0.5, 0.5, 2), (0.7, 0.4, 2))


def test_evaluate_routes_with_the_record_and_takes_a_given_threshold_for_itself(built, tmp_path, monkeypatch, capsys):
    tmp, _ = built
    seen = []
    init = RoutedEditedModel.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.routing)

    monkeypatch.setattr(RoutedEditedModel, "__init__", spy)
    record = KeyStore.read_routing(tmp / "cache" / KEYS_FILE)
    argv = ["evaluate", "-c", TINY, "--cache_dir", str(tmp / "cache"), "--no_edit", "true", "--matcher", "router",
            "--data.groups", "0:1", "--generation", "false", "--trainer.logger", "false"]
    main([*argv, "--output", str(tmp_path / "a.json")])
    assert seen and all(r == record for r in seen)
    assert "for this evaluation" not in capsys.readouterr().err
    seen.clear()
    main([*argv, "--routing.threshold", "0.97", "--output", str(tmp_path / "b.json")])
    assert seen and all(r.threshold == 0.97 and r.lexical_tiers == record.lexical_tiers for r in seen)
    assert "routing.threshold=0.97 (recorded: 0.95) for this evaluation" in capsys.readouterr().err
    assert KeyStore.read_routing(tmp / "cache" / KEYS_FILE) == record   # the file is unchanged
    seen.clear()
    err = _one_line_exit_2(capsys, [*argv, "--routing.common_from", "0", "--output", str(tmp_path / "c.json")])
    assert "routing.common_from=1, not routing.common_from=0" in err and not seen


def test_a_key_file_without_the_record_loads_with_the_defaults_of_its_time(tmp_path):
    store = KeyStore(layer=3)
    store.add("g", torch.randn(2, 8))
    store.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "routing"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    older = {"threshold": "0.9", "lexical_threshold": "0.8", "lexical_tiers": "[[0.5, 0.97, 1]]", "common_from": "3"}
    save_file(tensors, tmp_path / "separate.safetensors", metadata={**meta, **older})
    save_file(tensors, tmp_path / "oldest.safetensors", metadata=meta)   # before thresholds were stored
    separate = KeyStore.load(tmp_path / "separate.safetensors")
    assert separate.routing == RoutingSettings(threshold=0.9, lexical_threshold=0.8, lexical_tiers=[[0.5, 0.97, 1]],
                                               common_from=3, layer=3)
    assert KeyStore.read_routing(tmp_path / "separate.safetensors") == separate.routing
    oldest = KeyStore.load(tmp_path / "oldest.safetensors")
    assert oldest.routing == RoutingSettings(lexical_tiers=[], common_from=0, layer=3)
    assert oldest.group_ids() == ["g"] and torch.equal(oldest.keys("g"), store.keys("g"))


def test_a_refit_with_other_key_settings_is_refused_before_compute(built, capsys, monkeypatch):
    tmp, _ = built
    from lafn_lightning.cache import check_target

    _no_backbone(monkeypatch)
    before = (tmp / "cache" / KEYS_FILE).read_bytes()
    err = _one_line_exit_2(capsys, ["fit", "-c", TINY, "--cache_dir", str(tmp / "cache"), "--data.groups", "2:3",
                                    "--trainer.max_steps", "2", "--trainer.logger", "false",
                                    "--routing.common_from", "2"])
    assert "routing.common_from=1, not routing.common_from=2" in err and str(tmp / "cache") in err
    assert (tmp / "cache" / KEYS_FILE).read_bytes() == before
    with pytest.raises(ValueError, match=r"routing\.layer=1, not routing\.layer=2; use another cache_dir$"):
        check_target(tmp / "cache", None, routing=RoutingSettings(layer=2))
    check_target(tmp / "cache", None, routing=RoutingSettings(threshold=0.5, layer=1, common_from=1))   # agrees


def test_a_merge_of_keys_built_with_another_common_from_is_refused(built, tmp_path, capsys):
    tmp, _ = built
    other = tmp_path / "other"
    shutil.copytree(tmp / "cache", other)
    store = KeyStore.load(other / KEYS_FILE)
    store.common_from = 0
    store.save(other / KEYS_FILE)
    err = _one_line_exit_2(capsys, ["cache", "merge", str(tmp_path / "merged"), str(tmp / "cache"), str(other)])
    assert "routing.common_from=1, not routing.common_from=0" in err
    assert not (tmp_path / "merged" / "manifest.json").exists()


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_the_old_export_router_options_are_refused_with_the_new_name(old, tmp_path, capsys, monkeypatch):
    _no_backbone(monkeypatch)
    value = {"export.router_keys": "false", "export.router_lexical_tiers": "[[0.7, 0.4]]",
             "export.router_common_from": "1"}.get(old, "0.9")
    err = _one_line_exit_2(capsys, ["fit", "-c", TINY, "--cache_dir", str(tmp_path / "c"), f"--{old}", value])
    assert f"{old} is now {RENAMED[old]}" in err
    config = tmp_path / "old.yaml"
    config.write_text(f"export:\n  {old.split('.', 1)[1]}: {value}\n")
    err = _one_line_exit_2(capsys, ["evaluate", "-c", TINY, "-c", str(config), "--output", str(tmp_path / "r.json")])
    assert f"{old} is now {RENAMED[old]}" in err
