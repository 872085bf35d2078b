"""``model.lr_schedule``: the paper's constant Adam step, or a half-cosine fall to ``lr_floor``."""
import math

import lightning as L
import pytest

from conftest import fit


class _Rates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, module, *args):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_cosine_falls_from_lr_to_the_floor_over_max_steps(tmp_path):
    from lafn_lightning.api.settings import LafnCLI
    from conftest import CONFIGS

    runs = {}
    for schedule in ("constant", "cosine"):
        record = _Rates()
        cli = LafnCLI(["-c", str(CONFIGS / "tiny.yaml"), "--cache_dir", str(tmp_path / schedule), "--trainer.logger", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                       "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "6", "--model.stop_loss", "0",
                       "--model.lr", "0.4", "--model.lr_schedule", schedule, "--model.lr_floor", "0.25"], run=False)
        cli.trainer.callbacks.append(record)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[schedule] = record.rates
    assert runs["constant"] == [0.4] * 6
    expected = [0.4 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * k / 6))) for k in range(6)]
    assert runs["cosine"] == pytest.approx(expected)
    assert runs["cosine"][0] == pytest.approx(0.4) and runs["cosine"][-1] < runs["cosine"][1]


def test_unknown_schedule_and_floor_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(tmp_path, "--model.lr_schedule", "linear", "--trainer.fast_dev_run", "true")
    with pytest.raises(ValueError, match="lr_floor"):
        fit(tmp_path, "--model.lr_floor", "2", "--trainer.fast_dev_run", "true")
