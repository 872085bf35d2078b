import os
from pathlib import Path

import lightning  # noqa: F401  (imported before any test captures output: its log handlers keep the session's streams)
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The MzsRE dev records shipped inside the package (never ../shared)."""
    from lafn_lightning.data import default_dataset

    return Path(default_dataset())


def fit(tmp_path: Path, *overrides: str, config: str = "tiny.yaml"):
    """Run ``lafn fit`` in-process on a config with overrides; return the LightningCLI object."""
    from lafn_lightning.api.settings import LafnCLI

    args = ["fit", "-c", str(CONFIGS / config), "--cache_dir", str(tmp_path / "cache"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path), *overrides]
    return LafnCLI(args)


def strong_cache_of(folder: Path, groups: list):
    """A tiny-llama edit cache in ``folder`` holding ``groups`` with a large ΔV (+8, -8, ...) on every
    neuron of layers 1 and 2 (certain to change outputs); returns (groups, cache, model, tokenizer)."""
    import torch

    from lafn_lightning.backbone.fingerprint import fingerprint
    from lafn_lightning.backbone.loading import load_backbone
    from lafn_lightning.cache import CacheEntry, EditCache, write_shard

    model, tok = load_backbone("tiny-llama")
    layers = (1, 2)
    d_ff = model.config.intermediate_size
    entries = [CacheEntry(g.group_id, {lang: e.subject for lang, e in g.edits.items()}, layers,
                          torch.ones(len(layers), d_ff, dtype=torch.bool), torch.full((len(layers), d_ff), sign * 8.0))
               for g, sign in zip(groups, (1.0, -1.0))]
    write_shard(folder / "cache", entries, fingerprint(model, layers))
    return groups, EditCache.open(folder / "cache"), model, tok


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (and a shared 2-core machine does not thrash);
    tests on the real demo backbone use every core."""
    import torch

    threads = os.cpu_count() if request.node.get_closest_marker("demo") else 1
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(previous)
