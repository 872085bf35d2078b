"""Progress of a whole-dataset command: one line per step on stderr and the same figures in TensorBoard.

    progress = RunProgress("edit", total=150, done_before=16, log_dir=tensorboard_dir(config, "edit_dataset"))
    progress.update(16, skipped=1, unconverged=2)     # after each edit batch (or scored group)
    progress.close()

``lafn edit-dataset`` reports per edit batch, ``lafn evaluate`` per scored group (at most every
``every_n_seconds``): groups done / total, s/group, ETA, skipped and unconverged counts.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["RunProgress", "report_skipped", "tensorboard_dir"]


def tensorboard_dir(config: Mapping[str, Any], name: str) -> Path | None:
    """``<save_dir>/<logger name>/<name>`` of the config's TensorBoard logger (None without one;
    ``logger: true``: ``lightning_logs/<name>``)."""
    logger = (config.get("trainer") or {}).get("logger")
    if logger is True:
        return Path("lightning_logs") / name
    for lg in logger if isinstance(logger, list) else [logger]:
        if isinstance(lg, Mapping) and "TensorBoard" in str(lg.get("class_path", "")):
            init = lg.get("init_args", {}) or {}
            return Path(init.get("save_dir") or ".") / str(init.get("name") or "lightning_logs") / name
    return None


def report_skipped(skipped: Mapping[str, str]) -> None:
    """One stderr line per record a whole-dataset command leaves out, with its reason."""
    for reason in skipped.values():
        print(f"[lafn] skipped: {reason}", file=sys.stderr, flush=True)


class RunProgress:
    """Counts groups done against ``total`` and reports rate and ETA.

    Args:
        what: the verb of the line (``edit``, ``evaluate``).
        total: groups this command works on (skipped records not counted).
        done_before: groups already done by an earlier run (resume); they do not count in s/group.
        log_dir: TensorBoard directory for ``progress/*`` scalars (None: none).
        every_n_seconds: at most one line per this many seconds (0: every update); the last always prints.
    """

    def __init__(self, what: str, total: int, done_before: int = 0, log_dir: Path | None = None,
                 every_n_seconds: float = 0.0) -> None:
        self.what, self.total, self.done_before = what, total, done_before
        self.done, self.steps, self.every = done_before, 0, every_n_seconds
        self.start = self._last = time.perf_counter()
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def update(self, n: int, label: str | None = None, **counts: int) -> dict:
        """``n`` more groups done; ``counts`` (skipped, unconverged, ...) are printed and logged as given;
        ``label`` opens the line instead of ``what`` (e.g. ``edit batch 3/10 done``)."""
        self.done += n
        self.steps += 1
        now = time.perf_counter()
        fresh = self.done - self.done_before
        per_group = (now - self.start) / fresh if fresh else 0.0
        figures = {"groups_done": self.done, "groups_total": self.total, "s_per_group": per_group,
                   "eta_min": per_group * (self.total - self.done) / 60, **counts}
        if self.done >= self.total or now - self._last >= self.every:
            self._last = now
            extra = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
            print(f"[lafn] {label or self.what}: {self.done}/{self.total} groups, {per_group:.1f}s/group, about "
                  f"{figures['eta_min']:.1f} min left" + (f"; {extra}" if extra else ""), file=sys.stderr, flush=True)
        if self.writer is not None:
            for key, value in figures.items():
                self.writer.add_scalar(f"progress/{key}", value, self.steps)
            self.writer.flush()
        return figures

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
