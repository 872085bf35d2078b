"""Edit every selected group of a dataset into an edit cache, one edit batch per fit (resumable).

    from lafn_lightning.api import Settings, edit_dataset
    edit_dataset(Settings.from_config("demo", overrides={"data.groups": "0:16"}), edit_batch_size=8)

``lafn edit-dataset`` wraps :func:`edit_dataset`; ``lafn evaluate`` calls it for what is missing.
"""
from __future__ import annotations

import sys

from ..cache import EditCache, MANIFEST_NAME, set_skipped
from .progress import RunProgress, report_skipped, tensorboard_dir
from .settings import Settings

__all__ = ["edit_dataset", "plan_batches"]


def plan_batches(todo: list[int], edit_batch_size: int, world: int) -> list[list[int]]:
    """Record indices in batches of ``edit_batch_size``; every device needs a group of each
    batch, so a short last batch joins the previous one and a batch smaller than ``world`` is refused."""
    if edit_batch_size < 1:
        raise ValueError(f"edit_batch_size={edit_batch_size}: must be >= 1")
    if edit_batch_size < world:
        raise ValueError(f"edit_batch_size={edit_batch_size} is below the {world} devices: every device trains "
                         "groups of each edit batch")
    batches = [todo[i:i + edit_batch_size] for i in range(0, len(todo), edit_batch_size)]
    if batches and len(batches[-1]) < world:
        if len(batches) == 1:
            raise ValueError(f"{len(todo)} group(s) to edit cannot be split over {world} devices: "
                             "select more data.groups or lower trainer.devices")
        batches[-2:] = [batches[-2] + batches[-1]]
    return batches


def edit_dataset(settings: Settings, edit_batch_size: int = 4, redo: bool = False) -> list[str]:
    """Edit every group that ``data.groups`` selects into ``cache_dir``, ``edit_batch_size`` groups per fit.

    Groups already in the cache are skipped, so an interrupted run resumes where it stopped. A
    record that cannot be edited (a refused subject, no subject in its questions) is reported,
    left out and listed under ``skipped`` in the cache's manifest (``lafn cache stats``);
    ``--data.strict true`` stops at it instead. After each edit batch one line gives groups done /
    total, s/group, the ETA, skipped and unconverged counts; the same figures go to TensorBoard
    (``<logger dir>/edit_dataset``) per batch.

    Args:
        settings: the parsed config (``-c CONFIG`` and its ``--data.*``, ``--model.*``, ... options).
        edit_batch_size: groups per fit (K); one fit edits them together (groups never share gradient).
        redo: re-edit groups that are already in the cache.

    Returns:
        the group ids edited by this call.
    """
    cache_dir = settings.cache_dir
    selection = settings.load_selection()
    groups, skipped = selection.groups, selection.skipped
    report_skipped(skipped)
    done = set()
    if not redo and (cache_dir / MANIFEST_NAME).exists():
        done = set(EditCache.open(cache_dir).usable_group_ids())   # a missing/unreadable shard: edit again
    todo = [g.index for g in groups if g.group_id not in done]
    trainer, _, _ = settings.replace(data={"groups": todo[:1] or [groups[0].index]}).instantiate()
    world = trainer.num_devices * trainer.num_nodes
    batches = plan_batches(todo, edit_batch_size, world) if todo else []
    print(f"[lafn] {len(groups) + len(skipped)} record(s) selected (data.groups={settings.data.get('groups')!r}): "
          f"{len(skipped)} skipped, {len(groups) - len(todo)} already in {cache_dir}, {len(todo)} to edit in "
          f"{len(batches)} batch(es)", file=sys.stderr, flush=True)
    if skipped and (cache_dir / MANIFEST_NAME).exists():
        set_skipped(cache_dir, skipped)
    edited: list[str] = []
    unconverged = 0
    progress = RunProgress("edit", len(groups), len(groups) - len(todo), tensorboard_dir(settings.config, "edit_dataset"))
    try:
        for n, batch in enumerate(batches, 1):
            trainer, module, datamodule = settings.replace(data={"groups": batch}).instantiate()
            trainer.fit(module, datamodule)
            if trainer.interrupted:
                raise KeyboardInterrupt(f"edit batch {n} interrupted; the cache holds every earlier batch")
            ids = [datamodule.groups[k].group_id for k in range(len(datamodule.groups))]
            edited += ids
            unconverged += int((~module.stopped).sum()) if module.stopped is not None else 0
            if skipped:
                set_skipped(cache_dir, skipped)
            progress.update(len(ids), f"edit batch {n}/{len(batches)} done", skipped=len(skipped),
                            not_converged=unconverged)
    finally:
        progress.close()
    return edited

