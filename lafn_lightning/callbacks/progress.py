"""Progress lines that show in a log file (CI, ``nohup``), not only on a terminal."""
from __future__ import annotations

import sys
import time

import lightning as L


class LogProgress(L.Callback):
    """Print one line every ``every_n_seconds`` (and at the last step) with the step, active
    groups, target loss and an ETA against ``trainer.max_steps``; to stderr, flushed.

    Args:
        every_n_seconds: seconds between lines (0: every step).
        enabled: set false to silence it.
    """

    def __init__(self, every_n_seconds: float = 10.0, enabled: bool = True) -> None:
        self.every_n_seconds, self.enabled = every_n_seconds, enabled
        self._start = self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.enabled or trainer.global_rank != 0 or trainer.fast_dev_run:
            return
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.max_steps
        done = bool(trainer.should_stop) or (total > 0 and step >= total)
        if not done and now - self._last < self.every_n_seconds:
            return
        self._last = now
        metrics = trainer.callback_metrics
        active = int(metrics.get("train/active_groups", 0))
        loss = float(metrics.get("train/target_loss", float("nan")))
        per_step = (now - self._start) / max(step, 1)
        eta = "" if done or total <= 0 else f", at most {per_step * (total - step):.0f}s left"
        print(f"[lafn] step {step}/{total}: {active} group(s) still training, target loss {loss:.3f}, "
              f"{per_step:.2f}s/step{eta}", file=sys.stderr, flush=True)
