"""The edit module: the only trainable parameter is the masked ΔV [groups, edited layers, d_ff].

    module = LafnEditModule(backbone="demo", layers=[5, 6, 7, 17], dtype="bfloat16")
    trainer.fit(module, datamodule)      # NeuronLocator fills module.mask before the first step

The backbone is shared per process, frozen, and not saved in checkpoints. The loss, the
per-group early stop and the speed paths: docs/method.md.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backbone.ffn import SITES, adapter_for
from ..backbone.inputs import position_ids
from ..backbone.loading import load_backbone
from .chunked_loss import chunked_token_nll, head_softcap
from .injection import delta_hooks
from .lower_layers import LowerLayers


class LafnEditModule(L.LightningModule):
    """Learn ΔV for one edit batch.

    Args:
        backbone: local HF model folder, ``demo`` (Gemma-3-270M) or ``tiny-<family>``.
        layers: edited layer indices (paper: Llama-3.1-8B 11,12,13,31; Qwen2-7B 19,20,21,27; bloomz 9,10,11,29).
        dtype: backbone dtype: ``float32``, ``bfloat16`` or ``auto`` (bf16 where the hardware has bf16
            matrix units, else fp32); ΔV, the loss and the KL reference stay fp32.
        lr: Adam learning rate (paper 0.5).
        lambda_target, lambda_kl: loss weights (paper 1 and 0.0625).
        stop_loss: a group stops once its L_target is below this (mean token NLL; 0.05 ~ p(token) 0.95).
        first_token_weight: the answer's first token counts this many times in its row's mean token
            NLL (1: the paper's plain mean), in the loss and so in the stop rule. The first token is
            predicted from the question alone; the later ones also see the answer's start.
        site: where ΔV is added: ``value`` (input of the down-projection) or ``activation``.
        cache_lower_layers: compute the hidden states below the first edited layer once (they do
            not depend on ΔV) and run only the upper layers at every step. Same loss as the full
            forward; costs rows x sequence x d_model activations of memory.
        chunked_loss: compute the answer tokens' cross-entropy a few rows at a time through the
            LM head, forward and backward (:mod:`.chunked_loss`): same loss and gradient, without
            every answer token's full-vocabulary fp32 logits in memory at once.
        stop_rule: ``mean`` (paper): a group stops when its L_target (mean over languages) is below
            ``stop_loss``; ``every_language``: only when each language's mean target loss is.
        language_weighting: ``uniform`` (paper): L_target is the plain mean over languages and
            prefixes; ``loss``: each language is weighted by its share of the group's current
            (detached; with ``optimizer: lbfgs`` differentiated, so the gradient is the objective's)
            target loss, so lagging languages get more of the update.
        length_buckets: run the answer rows in this many forwards of rows of similar length
            (sorted by length, equal counts) instead of one padded to the longest row; same loss.
        prefix_cache: run the answer rows only from the first subject position of each forward
            (each length bucket, the rows then bucketed by their length from their subject
            position on) on: the positions left of it see no ΔV, so their keys and
            values in every layer are those of the unedited forward, captured once at fit start
            (transformers' ``DynamicCache``) and passed as the attention cache. Same loss and
            gradient; costs rows x sequence x layers x (keys + values) of memory. Off for
            backbones whose forward takes no attention cache.
        max_rows: at most this many answer rows per forward, each forward checkpointed (its
            activations are recomputed in the backward pass instead of kept), so the step's peak
            memory is that of one part, not of the whole edit batch (16 groups x 12 languages x 4
            prefixes is 768 rows); about one extra forward of compute; same loss and gradient.
            None: every row in one graph (the paper's setting; fastest where memory allows).
            ``auto`` (default): every row in one graph when the predicted peak (:mod:`.sizing`)
            fits ``memory_budget_gb`` and the rows hold at most ``part_tokens`` tokens; else the
            largest checkpointed part that fits. Chosen at fit start and printed.
        memory_budget_gb: the memory a step may use for ``max_rows: auto``; None: the device's
            free memory (GPU) or half the RAM (CPU, shared by the processes of the host).
        part_tokens: ``max_rows: auto``: at most this many running tokens per forward; None: 8192
            on a CPU (:data:`.sizing.CPU_PART_TOKENS`) and no limit on a GPU.
        drop_converged: a language whose mean target loss is below ``stop_loss`` leaves the
            group's forward (its rows are not run) until the group's next full step: every
            ``full_every`` steps of the group, and always before it may stop, all its languages
            run, and a language that drifted back above the stop loss rejoins. A group stops
            only on a full step, so the exported ΔV meets the stop rule as without this option.
            Not the paper's (off).
        full_every: with ``drop_converged``, a group's every ``full_every``-th step runs all its
            languages.
        drop_below: with ``drop_converged``, a language leaves once its loss is below
            ``stop_loss * drop_below`` (1: as soon as it is below the stop loss; smaller: only with a
            margin, so it is less likely to drift back above the stop loss while it is out). It
            rejoins on a full step where it is at or above the stop loss.
        converged_prompts: with ``drop_converged``, a converged language still runs its first this
            many prompts (the bare question first, with ``data.bare_prompt``), so the step keeps
            holding it; its loss on them decides whether it rejoins in full.
        lr_schedule: ``constant`` (paper); ``cosine``: the learning rate falls from ``lr`` to
            ``lr * lr_floor`` along a half cosine over ``trainer.max_steps``; ``adaptive``: each group
            has its own step size (a share of Adam's step at ``lr``, 1 at the start), multiplied by
            ``lr_up`` after a step that lowered the group's loss and by ``lr_down`` after one that
            raised it, within ``[lr_floor, lr_max]``.
        lr_floor: the last learning rate of ``cosine``, the smallest of ``adaptive``, as a share of ``lr``.
        optimizer: ``adam`` (paper) or ``lbfgs``: L-BFGS with its own curvature history per group,
            one evaluation per step (:mod:`.quasi_newton`): its first step moves the largest element
            of a group's ΔV by ``lr``, no step moves an element by more than ``lr * lr_max``, a
            group whose loss rose goes back half-way to its last better point, and after three such
            steps in a row it restarts from that point along its negative gradient. With
            ``language_weighting: loss`` the weights are differentiated (the gradient is that of the
            objective whose values it compares). Takes the ``constant`` schedule and no ``drop_converged``.
        lbfgs_history: ``lbfgs``: curvature pairs kept per group.
        lr_up, lr_down, lr_max: ``adaptive``: the step size's growth after a step that lowered the
            group's loss, its cut after one that raised it, and its largest share of ``lr``.
    """

    def __init__(
        self,
        backbone: str = "tiny-llama",
        layers: list[int] = (1, 2),
        dtype: str = "float32",
        lr: float = 0.5,
        lambda_target: float = 1.0,
        lambda_kl: float = 0.0625,
        stop_loss: float = 0.05,
        first_token_weight: float = 1.0,
        site: str = "value",
        cache_lower_layers: bool = True,
        chunked_loss: bool = True,
        stop_rule: str = "mean",
        language_weighting: str = "uniform",
        length_buckets: int = 1,
        max_rows: int | Literal["auto"] | None = "auto",
        prefix_cache: bool = True,
        memory_budget_gb: float | None = None,
        part_tokens: int | None = None,
        drop_converged: bool = False,
        full_every: int = 5,
        drop_below: float = 1.0,
        converged_prompts: int = 0,
        lr_schedule: str = "constant",
        lr_floor: float = 0.1,
        lr_up: float = 1.2,
        lr_down: float = 0.5,
        lr_max: float = 8.0,
        optimizer: str = "adam",
        lbfgs_history: int = 10,
    ) -> None:
        super().__init__()
        if site not in SITES:
            raise ValueError(f"model.site={site!r}: one of {SITES}")
        if max_rows is not None and max_rows != "auto" and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"model.max_rows={max_rows!r}: at least 1, auto (from model.memory_budget_gb) or null "
                             "(every row in one forward)")
        if memory_budget_gb is not None and memory_budget_gb <= 0:
            raise ValueError(f"model.memory_budget_gb={memory_budget_gb}: a positive number of GB (or null: from the device)")
        if part_tokens is not None and part_tokens < 1:
            raise ValueError(f"model.part_tokens={part_tokens}: at least 1 (or null: from the device)")
        if first_token_weight < 1:
            raise ValueError(f"model.first_token_weight={first_token_weight}: at least 1 (1: every answer token counts once)")
        if converged_prompts < 0:
            raise ValueError(f"model.converged_prompts={converged_prompts}: 0 or more prompts per converged language")
        if not 0 < drop_below <= 1:
            raise ValueError(f"model.drop_below={drop_below}: a share of model.stop_loss, above 0 and at most 1")
        if full_every < 1:
            raise ValueError(f"model.full_every={full_every}: at least 1 (every step runs every language)")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"model.lr_schedule={lr_schedule!r}: one of {LR_SCHEDULES}")
        if not 0 <= lr_floor <= 1:
            raise ValueError(f"model.lr_floor={lr_floor}: a share of model.lr between 0 and 1")
        if lr_up < 1:
            raise ValueError(f"model.lr_up={lr_up}: at least 1 (the growth of a group's step after it lowered its loss)")
        if not 0 < lr_down <= 1:
            raise ValueError(f"model.lr_down={lr_down}: above 0 and at most 1 (the cut after a step that raised the loss)")
        if lr_max < 1:
            raise ValueError(f"model.lr_max={lr_max}: at least 1 (the largest share of model.lr)")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r}: one of {OPTIMIZERS}")
        if optimizer == "lbfgs" and (lr_schedule != "constant" or drop_converged):
            raise ValueError("model.optimizer=lbfgs sets its own step length: it takes model.lr_schedule=constant "
                             "and no model.drop_converged (whose partial steps give losses it cannot compare)")
        if lbfgs_history < 1:
            raise ValueError(f"model.lbfgs_history={lbfgs_history}: at least 1 curvature pair per group")
        if stop_rule not in STOP_RULES:
            raise ValueError(f"model.stop_rule={stop_rule!r}: one of {STOP_RULES}")
        if language_weighting not in WEIGHTINGS:
            raise ValueError(f"model.language_weighting={language_weighting!r}: one of {WEIGHTINGS}")
        self.save_hyperparameters()
        model, self.tokenizer = load_backbone(backbone, dtype)
        object.__setattr__(self, "backbone", model)  # shared and frozen: not a registered submodule
        self.adapter = adapter_for(model)
        self.adapter.check_layers(list(layers), key="model.layers")
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        # transformers 5 renames past_key_values to cache; either takes a DynamicCache
        self._cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None) if prefix_cache else None
        self.layers = [int(i) for i in layers]
        self.delta_v: nn.Parameter | None = None
        first = min(self.layers)
        self.lower = LowerLayers(model, self.adapter, first) if cache_lower_layers and first > 0 else None
        self._lower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefix_kv: dict[str, tuple[torch.Tensor, list]] = {}   # key -> (ids, [(keys, values)] per layer)
        self.final_language_loss: torch.Tensor | None = None  # [groups, languages], last measured
        self.rows_per_forward: int | None = None if max_rows == "auto" else max_rows   # resolved at fit start

    # ---- state -------------------------------------------------------------------------------
    def allocate(self, n_groups: int) -> None:
        shape = (n_groups, len(self.layers), self.adapter.d_ff)
        if self.delta_v is not None and tuple(self.delta_v.shape) == shape:
            return
        self.delta_v = nn.Parameter(torch.zeros(shape))
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("located", torch.zeros((), dtype=torch.bool))
        self.register_buffer("stopped", torch.zeros(n_groups, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros(n_groups, dtype=torch.long))
        self.register_buffer("final_target_loss", torch.full((n_groups,), float("nan")))
        self.register_buffer("frozen", torch.zeros(shape), persistent=True)
        self.register_buffer("full_due", torch.ones(n_groups, dtype=torch.bool), persistent=False)   # drop_converged
        self.register_buffer("step_size", torch.ones(n_groups), persistent=False)              # lr_schedule adaptive
        self.register_buffer("last_loss", torch.full((n_groups,), float("inf")), persistent=False)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "groups"):
            raise ValueError("LafnEditModule needs an EditBatchDataModule")
        self.allocate(len(dm.groups))
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if ddp_kwargs is not None:
            # Each process owns a shard of the groups and keeps its own masks and progress;
            # DDP must not overwrite them with rank 0's buffers. Gradients are still all-reduced:
            # a group's gradient comes only from its owner (the others contribute zeros).
            ddp_kwargs["broadcast_buffers"] = False

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.allocate(checkpoint["state_dict"]["delta_v"].shape[0])

    def on_fit_start(self) -> None:
        if not bool(self.located):
            raise RuntimeError("no neurons were located before the fit: add the NeuronLocator callback "
                               "(lafn fit does) or fill module.mask and set module.located")
        self.backbone.to(self.device)
        mine = torch.zeros_like(self.stopped)
        mine[self.trainer.datamodule.mine] = True
        self.stopped |= ~mine  # groups of other processes are never trained here
        b = self.trainer.datamodule.batch

        def unedited(key: str, prefix: bool = False) -> torch.Tensor:
            """One unedited forward of the ``key`` rows; keeps their lower-layer states if cached
            and, with ``prefix``, every layer's keys and values."""
            ids, att = b[f"{key}input_ids"].to(self.device), b[f"{key}attention_mask"].to(self.device)
            cache = _new_cache() if prefix else None
            if self.lower is None:
                logits = self._run(ids, att, keep=1, cache=cache)
            else:
                states, logits = self.lower.capture(lambda: self._run(ids, att, keep=1, cache=cache))
                self._lower_states[key] = (ids, states)
            kv = _cache_tensors(cache, ids.shape[1]) if prefix else None
            if kv is not None:   # the layers below the first edited one never run again: not kept
                skipped = self.lower.first if self.lower is not None else 0
                self._prefix_kv[key] = (ids, [None if i < skipped else x for i, x in enumerate(kv)])
            return logits

        self._lower_states, self._prefix_kv = {}, {}
        with torch.no_grad():
            if self.lower is not None or self._cache_kw is not None:
                unedited("", prefix=self._cache_kw is not None)   # answer rows: states and keys/values kept
            logits = unedited("kl_")
        self.kl_reference = logits[:, -1].float().log_softmax(-1)  # log P_orig at each anchor's last position
        if self.hparams.get("max_rows", None) == "auto":
            self.rows_per_forward = self._auto_max_rows(b)

    def _auto_max_rows(self, batch: dict) -> int | None:
        """``max_rows: auto``: the rows per checkpointed forward that keep the predicted peak within
        the memory budget (:func:`.sizing.auto_max_rows`); printed with the prediction."""
        from lightning.pytorch.utilities import rank_zero_info

        from .sizing import (Architecture, auto_max_rows, batch_shape, default_part_tokens, delta_v_copies,
                             device_budget_gb, step_memory)

        hp = self.hparams
        shape = batch_shape(batch)
        budget = hp.get("memory_budget_gb") or device_budget_gb(self.device)
        if not hp.get("memory_budget_gb") and self.device.type == "cpu":   # processes on one host share its RAM
            budget /= max(1, self.trainer.num_devices)
        first = min(self.layers)
        kwargs = dict(device=self.device.type, cache_lower_layers=self.lower is not None,
                      prefix_cache=bool(self._prefix_kv), edited_layers=len(self.layers),
                      delta_v_copies=delta_v_copies(hp))
        arch = Architecture.of(self.backbone)
        part_tokens = hp.get("part_tokens") or default_part_tokens(self.device.type)
        rows = auto_max_rows(arch, shape, first, budget * 1e9, part_tokens=part_tokens, **kwargs)
        peak = step_memory(arch, shape, first, max_rows=rows, **kwargs).peak
        rank_zero_info(f"[lafn] memory: {shape.rows} answer rows, {'all in one forward' if rows is None else f'{rows} per checkpointed forward'}; "
                       f"predicted peak {peak / 1e9:.1f} GB of a {budget:.1f} GB budget (model.memory_budget_gb)")
        return rows

    def configure_optimizers(self):
        hp = self.hparams
        if hp.get("optimizer", "adam") == "lbfgs":
            from .quasi_newton import GroupLBFGS

            return GroupLBFGS([self.delta_v], lr=hp.lr, max_move=hp.lr * hp.get("lr_max", 8.0),
                              history=hp.get("lbfgs_history", 10), group_loss=lambda: self.step_loss)
        optimizer = torch.optim.Adam([self.delta_v], lr=self.hparams.lr)
        if self.hparams.get("lr_schedule", "constant") in ("constant", "adaptive"):   # adaptive: optimizer_step
            return optimizer
        import math

        total, floor = self.trainer.max_steps, self.hparams.get("lr_floor", 0.1)
        if total < 1:
            raise ValueError("model.lr_schedule=cosine falls over trainer.max_steps: set it (e.g. --trainer.max_steps 120)")

        def share(step: int) -> float:   # of model.lr at this step
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, share)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def effective_delta(self) -> torch.Tensor:
        return self.delta_v * self.mask

    # ---- forward -------------------------------------------------------------------------------
    def _run(self, ids, att, keep: int, cache=None):
        """Backbone logits of the last ``keep`` positions of left-padded rows. With an attention
        ``cache`` of the rows' first positions, ``ids`` are the positions after them (``att``
        covers all)."""
        kwargs = {"logits_to_keep": keep}
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids(att)[:, att.shape[1] - ids.shape[1]:]
        if cache is not None:
            kwargs[self._cache_kw] = cache
            kwargs["use_cache"] = True
        return self.backbone(input_ids=ids, attention_mask=att, **kwargs).logits

    def _forward(self, ids, att, groups, positions, keep: int, lower: torch.Tensor | None = None,
                 head_at: torch.Tensor | None = None, head_inputs: list | None = None, cache=None):
        """Logits with ΔV of ``groups`` at ``positions``; from cached lower-layer states if given;
        ``cache``: the attention cache of the first positions (see :meth:`_run`; ``ids``,
        ``positions`` and ``lower`` then cover the positions after them);
        ``head_at`` ([rows, keep] bool): project only those positions (logits [n, vocab]);
        ``head_inputs`` (a list): append the LM head's input at ``head_at`` ([n, d]) to it and
        skip the projection (logits [0, vocab])."""
        values = self.effective_delta()[groups]
        rows = torch.arange(len(groups), device=ids.device)
        with ExitStack() as stack:
            hooks = stack.enter_context(delta_hooks(self.backbone, self.adapter, self.layers, self.hparams.site,
                                                    rows, positions, values))
            if head_at is not None:
                def select(x):
                    x = x[head_at]
                    if head_inputs is None:
                        return x
                    head_inputs.append(x)
                    return x[:0]
                hooks.on_input(self.backbone.get_output_embeddings(), select)
            if lower is not None:
                stack.enter_context(self.lower.skipping(lower))
            return self._run(ids, att, keep, cache)

    def _cached_lower(self, key: str, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Captured lower-layer states of ``ids[rows]`` if ``ids`` is the batch they were captured for."""
        states = _captured(self._lower_states, key, ids)
        return None if states is None else states[rows]

    def _prefix(self, key: str, ids: torch.Tensor, rows: torch.Tensor, cut: int, n: int, lower=None):
        """An attention cache holding every layer's unedited keys and values of ``ids[rows]`` at
        columns ``cut .. cut + n`` (None if they were not captured for this batch, or if the layers
        below the first edited one were not kept and will run: ``lower`` None)."""
        kv = _captured(self._prefix_kv, key, ids)
        if kv is None or (kv[0] is None and lower is None):   # layers not kept: only with cached lower states
            return None
        cache = _new_cache()
        for i, layer in enumerate(kv):
            if layer is not None:
                cache.update(layer[0][rows, :, cut:cut + n], layer[1][rows, :, cut:cut + n], i)
        kept = next(i for i, layer in enumerate(kv) if layer is not None)
        for i in range(kept):   # skipped layers: never read, but the cache's length is read from layer 0
            stand_in = cache.layers[kept].keys.new_zeros(()).expand_as(cache.layers[kept].keys)
            cache.layers[i].lazy_initialization(stand_in, stand_in)
            cache.layers[i].keys = cache.layers[i].values = stand_in
        return cache

    def _answer_token_nll(self, batch: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL of every answer token of ``rows`` and, per token, its index into ``rows``.

        Rows are left-padded, so the columns left of the longest of these rows are padding for all
        of them and are dropped. Every answer ends at the last position, so only the last ``keep``
        positions can predict answer tokens, and the vocabulary projection (which dominates small
        models) runs only at the positions that do (``answer_at``).
        """
        att = batch["attention_mask"][rows]
        cut = att.shape[1] - int(att.sum(1).max())
        ids, att, tmask = batch["input_ids"][rows, cut:], att[:, cut:], batch["target_mask"][rows, cut:]
        width = ids.shape[1]
        first = int(tmask.any(0).nonzero().min()) if tmask.any() else width - 1
        answer_at = tmask[:, first:]                          # [rows, keep]: logits at t predict token t + 1
        lower = self._cached_lower("", batch["input_ids"], rows)
        positions = batch["subject_pos"][rows] - cut
        # columns left of every row's ΔV position keep their unedited keys and values (prefix_cache)
        n = min(int(positions.min()), first)
        cache = self._prefix("", batch["input_ids"], rows, cut, n, lower) if n > 0 else None
        skip = n if cache is not None else 0
        head_inputs = [] if self.hparams.chunked_loss else None
        logits = self._forward(ids[:, skip:], att, batch["group"][rows], positions - skip, width - first,
                               None if lower is None else lower[:, cut + skip:], head_at=answer_at,
                               head_inputs=head_inputs, cache=cache)
        row_of, t = answer_at.nonzero(as_tuple=True)
        gold = ids[row_of, first + t + 1]
        if head_inputs:
            head = self.backbone.get_output_embeddings()
            return chunked_token_nll(head_inputs[0], head.weight, gold, bias=getattr(head, "bias", None),
                                     softcap=head_softcap(self.backbone)), row_of
        return F.cross_entropy(logits.float(), gold, reduction="none"), row_of

    def losses(self, batch: dict, active: torch.Tensor | None = None, cells: torch.Tensor | None = None) -> dict:
        """Per-group L_target and L_kl (and per-row answer log-probabilities) for the active groups;
        with ``cells`` ([groups, languages] bool), only the answer rows of those languages run
        (L_target and the language weights are then over those languages)."""
        n_groups = self.delta_v.shape[0]
        active = torch.ones(n_groups, dtype=torch.bool, device=self.device) if active is None else active
        run = active[batch["group"]]
        if cells is not None:
            keep = _prompt_rank(batch) < self.hparams.get("converged_prompts", 0)
            run = run & (cells[batch["group"], batch["language"]] | keep)
        rows = run.nonzero().squeeze(1)
        groups = batch["group"][rows]
        # Rows of very different lengths (12 scripts) waste compute on padding: with
        # `length_buckets` > 1 the rows run in that many forwards of similar length (same loss).
        # With the prefix cache only the positions from the ΔV position on run, so "length" is that.
        if _captured(self._prefix_kv, "", batch["input_ids"]) is not None:
            length = batch["input_ids"].shape[1] - batch["subject_pos"][rows]
        else:
            length = batch["attention_mask"][rows].sum(1)
        order = length.argsort(stable=True)
        max_rows = self.rows_per_forward
        n_parts = max(1, self.hparams.get("length_buckets", 1), -(-len(rows) // max_rows) if max_rows else 1)
        parts = [p for p in order.tensor_split(n_parts) if len(p)]
        tok_parts, row_parts = [], []
        for part in parts:
            if max_rows and torch.is_grad_enabled():   # keep only this part's outputs; recompute in backward
                tok_nll, row_of = checkpoint(self._answer_token_nll, batch, rows[part], use_reentrant=False)
            else:
                tok_nll, row_of = self._answer_token_nll(batch, rows[part])
            tok_parts.append(tok_nll)
            row_parts.append(part[row_of])
        tok_nll, row_of = torch.cat(tok_parts), torch.cat(row_parts)
        zeros = torch.zeros(len(rows), device=tok_nll.device)
        # a row's tokens are consecutive and in order: its first answer token opens its run
        first = torch.ones_like(row_of, dtype=torch.bool)
        first[1:] = row_of[1:] != row_of[:-1]
        weight = torch.where(first, float(self.hparams.get("first_token_weight", 1.0)), 1.0).to(tok_nll)
        n_tok = zeros.index_add(0, row_of, weight).clamp(min=1)
        row_logprob = -zeros.index_add(0, row_of, tok_nll)    # log P(answer | prompt)
        row_nll = zeros.index_add(0, row_of, weight * tok_nll) / n_tok   # (weighted) mean token NLL of the answer

        a_rows = active[batch["kl_group"]].nonzero().squeeze(1)
        a_logits = self._forward(batch["kl_input_ids"][a_rows], batch["kl_attention_mask"][a_rows],
                                 batch["kl_group"][a_rows], batch["kl_subject_pos"][a_rows], keep=1,
                                 lower=self._cached_lower("kl_", batch["kl_input_ids"], a_rows))
        edited = a_logits[:, -1].float().log_softmax(-1)
        ref = self.kl_reference[a_rows]
        kl = F.kl_div(edited, ref, log_target=True, reduction="none").sum(-1)

        target = _group_mean(row_nll, groups, n_groups)
        kl_g = _group_mean(kl, batch["kl_group"][a_rows], n_groups)
        n_langs = int(batch["language"].max()) + 1
        langs = batch["language"][rows]
        cell = _group_mean(row_nll, groups * n_langs + langs, n_groups * n_langs).view(n_groups, n_langs)
        present = torch.zeros(n_groups * n_langs, dtype=torch.bool, device=cell.device)
        present[groups * n_langs + langs] = True
        language_target = torch.where(present.view(n_groups, n_langs), cell, torch.full_like(cell, float("nan")))
        objective = target
        if self.hparams.get("language_weighting", "uniform") == "loss":
            # Adam follows the weighted losses at fixed (detached) weights; L-BFGS compares the objective's
            # values from step to step, so it descends the objective itself, weights included
            weights = language_target if self.hparams.get("optimizer", "adam") == "lbfgs" else language_target.detach()
            weights = weights.nan_to_num(0.0)
            weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)   # sums to 1 per group
            objective = (weights * language_target.nan_to_num(0.0)).sum(1)
        return {"target": target, "kl": kl_g, "row_logprob": row_logprob, "rows": rows,
                "row_nll": row_nll, "language_target": language_target, "objective": objective}

    def training_step(self, batch: dict, batch_idx: int):
        active = ~self.stopped
        n_langs = int(batch["language"].max()) + 1
        if self.final_language_loss is None or self.final_language_loss.shape != (len(active), n_langs):
            self.final_language_loss = torch.full((len(active), n_langs), float("nan"), device=self.device)
        hp = self.hparams
        drop = bool(hp.get("drop_converged", False))
        full = active & self.full_due if drop else active       # groups whose every language runs
        cells = None
        if drop:   # [groups, languages]: run a language unless it converged (its last measured loss)
            cells = full[:, None] | ~(self.final_language_loss < hp.stop_loss * hp.get("drop_below", 1.0))
        out = self.losses(batch, active, cells)
        per_group = hp.lambda_target * out["objective"] + hp.lambda_kl * out["kl"]
        # Sum over groups (not mean): each group's gradient is what it would be alone. DDP averages
        # gradients over processes, and only a group's owner contributes: scale back by world size.
        loss = per_group[active].sum() * self.trainer.world_size
        with torch.no_grad():
            if hp.get("lr_schedule", "constant") == "adaptive":
                self._adapt_step_size(per_group.detach(), full)
            self.step_loss = per_group.detach()   # this step's loss per group (optimizer lbfgs reads it)
            self.steps[active] += 1
            lang_loss = out["language_target"].detach()
            ran = ~torch.isnan(lang_loss) & active[:, None]
            self.final_language_loss[ran] = lang_loss[ran]
            self.final_target_loss[full] = out["target"][full].detach()
            # the stop rule is only checked where every language ran
            done = full & self.reached(out["target"].detach(), lang_loss)
            if done.any():  # freeze the ΔV that reached the threshold (before this step's update)
                self.frozen[done] = self.delta_v.detach()[done]
                self.stopped |= done
            if drop:
                estimate = self.final_language_loss
                partial = active & ~full
                self.final_target_loss[partial] = estimate[partial].nanmean(1)
                # a group that would stop on its latest per-language losses runs in full next
                self.full_due = (self.reached(estimate.nanmean(1), estimate)
                                 | (self.steps % hp.get("full_every", 5) == 0))
        n_active = int(active.sum())
        self.log_dict({
            "train/loss": loss.detach() / max(n_active, 1),
            "train/target_loss": self.final_target_loss[active].mean(),
            "train/kl_loss": out["kl"][active].mean().detach(),
            "train/dv_norm": self.effective_delta().detach().norm(dim=-1).mean(),
            "train/active_groups": float(self.stopped.numel() - int(self.stopped.sum())),
            "train/rows": float(len(out["rows"])),
        }, prog_bar=False, on_step=True, batch_size=1)
        if hp.get("lr_schedule", "constant") == "adaptive" and n_active:
            self.log("train/step_size", self.step_size[active].mean(), on_step=True, batch_size=1)
        self.log("loss", loss.detach() / max(n_active, 1), prog_bar=True, on_step=True, logger=False, batch_size=1)
        langs = batch["language"][out["rows"]]
        names = self.trainer.datamodule.languages
        for li, lang in enumerate(names):
            sel = langs == li
            if sel.any():
                self.log(f"train/prob/{lang}", out["row_logprob"][sel].exp().mean().detach(), on_step=True, batch_size=1)
            if active.any():
                self.log(f"train/target/{lang}", self.final_language_loss[active, li].nanmean(), on_step=True, batch_size=1)
        if self.trainer.strategy.reduce_boolean_decision(bool(self.stopped.all()), all=True):
            self.trainer.should_stop = True
        return loss

    def reached(self, target: torch.Tensor, language_target: torch.Tensor) -> torch.Tensor:
        """Per group: has it met the stop rule? (``target`` [groups], ``language_target`` [groups, languages], NaN where absent)."""
        if self.hparams.stop_rule == "mean":
            return target < self.hparams.stop_loss
        worst = torch.where(torch.isnan(language_target), torch.full_like(language_target, -float("inf")), language_target)
        return worst.amax(1) < self.hparams.stop_loss

    def _adapt_step_size(self, loss: torch.Tensor, measured: torch.Tensor) -> None:
        """``lr_schedule: adaptive``: grow the step size of each ``measured`` group whose ``loss``
        fell since its last measurement, cut it where it rose (no other group's loss counts)."""
        hp = self.hparams
        scale = torch.where(loss < self.last_loss, torch.full_like(loss, hp.get("lr_up", 1.2)),
                            torch.full_like(loss, hp.get("lr_down", 0.5)))
        scale[torch.isinf(self.last_loss)] = 1.0   # a group's first measurement: nothing to compare with
        new = (self.step_size * scale).clamp(hp.get("lr_floor", 0.1), hp.get("lr_max", 8.0))
        self.step_size = torch.where(measured, new, self.step_size)
        self.last_loss = torch.where(measured, loss, self.last_loss)

    def optimizer_step(self, *args, **kwargs):
        adaptive = self.hparams.get("lr_schedule", "constant") == "adaptive"
        before = self.delta_v.detach().clone() if adaptive else None
        super().optimizer_step(*args, **kwargs)   # runs training_step (the closure), then Adam at model.lr
        with torch.no_grad():
            if before is not None:   # each group's Adam step, scaled by its own step size
                self.delta_v.copy_(torch.lerp(before, self.delta_v, self.step_size[:, None, None]))
            self.delta_v[self.stopped] = self.frozen[self.stopped]  # Adam momentum must not move a stopped group

    def final_delta(self) -> torch.Tensor:
        """ΔV as exported: the frozen value for stopped groups, the last value otherwise; zero off the mask."""
        with torch.no_grad():
            dv = torch.where(self.stopped[:, None, None], self.frozen, self.delta_v)
            return dv * self.mask


#: Stop rules of :class:`LafnEditModule` (``mean`` is the paper's).
STOP_RULES = ("mean", "every_language")
#: Language weightings of L_target (``uniform`` is the paper's).
WEIGHTINGS = ("uniform", "loss")
#: Learning-rate schedules (``constant`` is the paper's).
LR_SCHEDULES = ("constant", "cosine", "adaptive")
#: Optimizers of ΔV (``adam`` is the paper's).
OPTIMIZERS = ("adam", "lbfgs")


def _prompt_rank(batch: dict) -> torch.Tensor:
    """Per answer row, its index among the rows of its group and language (the datamodule writes
    a group's rows language by language, prompt by prompt)."""
    key = batch["group"] * (int(batch["language"].max()) + 1) + batch["language"]
    index = torch.arange(len(key), device=key.device)
    first = torch.full((int(key.max()) + 1,), len(key), device=key.device).scatter_reduce(0, key, index, "amin")
    return index - first[key]


def _captured(store: dict, key: str, ids: torch.Tensor):
    """``store[key]``'s tensors if they were captured for the batch ``ids`` (else None)."""
    if key not in store:
        return None
    cached_ids, value = store[key]
    if cached_ids.shape != ids.shape or not torch.equal(cached_ids, ids.to(cached_ids.device)):
        return None
    return value


def _new_cache():
    """An empty attention cache that keeps every position of every layer (no sliding window)."""
    from transformers import DynamicCache

    return DynamicCache()


def _cache_tensors(cache, width: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (keys, values) [rows, heads, width, head_dim] from a filled ``DynamicCache``, or None
    where the backbone left it in another form (then the prefix is not cached)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    kv = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if any(not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] != width for k, _ in kv):
        return None
    return [(k.detach(), v.detach()) for k, v in kv]


def _group_mean(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    sums = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(0, groups, values)
    counts = torch.zeros(n_groups, device=values.device, dtype=values.dtype).index_add(0, groups, torch.ones_like(values))
    return sums / counts.clamp(min=1)
