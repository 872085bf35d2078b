"""Export the learned ΔV of the edit batch into the edit cache after the fit."""
from __future__ import annotations

from dataclasses import replace

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lafn_lightning.backbone.fingerprint import fingerprint
from lafn_lightning.cache import CacheEntry, CacheError, check_target, write_shard
from lafn_lightning.cache.store import ValueOverflow, shard_bytes
from lafn_lightning.editing.record import edit_record
from lafn_lightning.routing.settings import RoutingSettings, router_layer


class CacheExport(L.Callback):
    """Write {subjects: ΔV} of every group of the edit batch into ``cache_dir``.

    The shard, the router keys and the manifest are one commit (each file atomic, the manifest
    last), so an interrupted run leaves the cache as it was. Nothing is exported from
    ``fast_dev_run`` or an interrupted fit. An export that fails (a full disk, values float16
    cannot hold) keeps the trained ΔV in ``lafn-unexported-*.safetensors`` (the trainer's
    ``default_root_dir``, else the working or temporary directory) and names it in its one-line
    error: ``lafn cache import FILE CACHE_DIR`` adds it later.

    Args:
        cache_dir: the edit cache directory (several fits add to one cache).
        value_dtype: storage dtype of the located neurons' values: ``float16`` or ``bfloat16``.
        routing: the router settings (the config's ``routing`` section, linked by ``lafn``):
            with ``routing.keys``, the groups' router keys are added to
            ``cache_dir/router_keys.safetensors`` with these settings recorded beside them
            (:class:`~lafn_lightning.routing.settings.RoutingSettings`; layer None: the first
            edited layer). None: the defaults.
    """

    def __init__(self, cache_dir: str = "edit_cache", value_dtype: str = "float16",
                 routing: RoutingSettings | None = None) -> None:
        if value_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"export.value_dtype={value_dtype!r}: float16 or bfloat16")
        self.cache_dir, self.value_dtype = cache_dir, value_dtype
        self.routing = routing if routing is not None else RoutingSettings()
        self.last_written = None

    def _routing(self, pl_module) -> RoutingSettings | None:
        """The routing settings of this fit's keys (layer resolved), or None without keys."""
        if not self.routing.keys:
            return None
        layer = self.routing.layer if self.routing.layer is not None else router_layer(pl_module.layers)
        return replace(self.routing, layer=layer)

    def entries(self, trainer: L.Trainer, pl_module) -> list[CacheEntry]:
        dm = trainer.datamodule
        delta = pl_module.final_delta().float().cpu()
        mask = pl_module.mask.cpu()
        out = []
        for k in dm.mine:  # each process exports its own shard; the cache's lock merges them
            group = dm.groups[k]
            if int(pl_module.steps[k]) == 0:  # never trained: nothing to export (edit-dataset will redo it)
                continue
            meta = {
                "index": group.index,
                "steps": int(pl_module.steps[k]),
                "target_loss": float(pl_module.final_target_loss[k]),
                "converged": bool(pl_module.stopped[k]),
                "language_loss": _language_loss(pl_module, dm, k),
                "located": [int(n) for n in mask[k].sum(-1)],
                "dataset": str(dm.dataset),
                "fact": group.digest,
            }
            out.append(CacheEntry(group_id=group.group_id, subjects={l: e.subject for l, e in group.edits.items()},
                                  layers=tuple(pl_module.layers), mask=mask[k], delta=delta[k], meta=meta))
        return out

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Refuse a cache this fit could not write into before any compute (one line)."""
        if stage == "fit" and not trainer.fast_dev_run:
            fp = fingerprint(pl_module.backbone, pl_module.layers)
            need = shard_bytes(len(trainer.datamodule.mine), len(pl_module.layers), int(fp.get("d_ff") or 0),
                               4 if self.value_dtype == "float32" else 2)
            check_target(self.cache_dir, fp, self.record(trainer, pl_module), need_bytes=need,
                         routing=self._routing(pl_module))

    def _router_keys(self, trainer: L.Trainer, pl_module, exported: set[str], fp: dict):
        """What ``write_shard(router_keys=)`` calls under the cache lock: the cache's keys with
        the exported groups' added (computed there, written in the same commit as the shard)."""
        from lafn_lightning.routing.build import extend_cache_keys

        groups = [g for g in trainer.datamodule.groups if g.group_id in exported]

        routing = self._routing(pl_module)

        def extend(store):
            return extend_cache_keys(pl_module.backbone, pl_module.tokenizer, store, groups, layer=routing.layer,
                                     fingerprint=fp, where=self.cache_dir, routing=routing)
        return extend

    @staticmethod
    def record(trainer: L.Trainer, pl_module) -> dict:
        """How this fit makes its edits (stored once per cache; see :mod:`lafn_lightning.editing.record`)."""
        dm = trainer.datamodule
        locator = next((cb for cb in trainer.callbacks if type(cb).__name__ == "NeuronLocator"), None)
        return edit_record(pl_module.hparams, languages=dm.languages, num_prefixes=dm.hparams.num_prefixes,
                           prefix_length=dm.hparams.prefix_length, seed=dm.hparams.seed,
                           paraphrases=dm.hparams.paraphrases, beta=getattr(locator, "beta", None),
                           strategy=getattr(locator, "strategy", None), max_steps=trainer.max_steps,
                           subject_site=dm.hparams.subject_site, bare_prompt=dm.hparams.bare_prompt,
                           paraphrase_prompts=dm.hparams.paraphrase_prompts)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.fast_dev_run or trainer.interrupted:
            rank_zero_info("[lafn] fast_dev_run/interrupted: nothing exported to the edit cache")
            return
        import torch

        entries = self.entries(trainer, pl_module)
        if not entries:
            rank_zero_info("[lafn] no group was trained: nothing exported")
            return
        fp = fingerprint(pl_module.backbone, pl_module.layers)
        settings = self.record(trainer, pl_module)
        keys = self._router_keys(trainer, pl_module, {e.group_id for e in entries}, fp) if self.routing.keys else None
        try:
            self.last_written = write_shard(self.cache_dir, entries, fp, value_dtype=getattr(torch, self.value_dtype),
                                            settings=settings, router_keys=keys)
        except (CacheError, OSError, ValueError) as exc:
            from lafn_lightning.cache.rescue import save_unexported

            kept = save_unexported(entries, fp, settings, [trainer.default_root_dir, "."])
            overflow = isinstance(exc, ValueOverflow)
            dtype = "bfloat16" if overflow else self.value_dtype
            add = f"lafn cache import {kept} {self.cache_dir}" + ("" if dtype == "float16" else f" --value_dtype {dtype}")
            raise CacheError(f"{exc}; the trained ΔV of {len(entries)} group(s) is kept in {kept} "
                             f"(`{add}` adds it{'' if overflow else ' once the cause is fixed'})") from exc
        for e in entries:
            rank_zero_info(f"[lafn] {e.group_id}: {e.meta['steps']} steps, target loss {e.meta['target_loss']:.3f}"
                           f"{'' if e.meta['converged'] else ' (not converged)'}, neurons {e.meta['located']}")
        rank_zero_info(f"[lafn] exported {len(entries)} group(s) to {self.cache_dir}")


def _language_loss(pl_module, dm, k: int) -> dict[str, float] | None:
    """Group ``k``'s mean target loss per language at its last step (None before any step)."""
    losses = getattr(pl_module, "final_language_loss", None)
    if losses is None:
        return None
    return {lang: round(float(v), 5) for lang, v in zip(dm.languages, losses[k].tolist()) if v == v}
