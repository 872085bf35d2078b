"""The record of how edits were made, stored once per edit cache (as PEFT saves its adapter config).

    record = edit_record(module.hparams, datamodule, locator, max_steps=40)
    write_shard(cache_dir, entries, fp, settings=record)    # a cache refuses other settings

``EditedModel.from_cache`` reads ``backbone``, ``dtype`` and ``site`` back from it.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..backbone.loading import dtype_name


def edit_record(model: Mapping[str, Any], *, languages, num_prefixes: int, prefix_length: int, seed: int,
                paraphrases: str | None, beta: float | None, strategy: str | None, max_steps: int,
                subject_site: str = "fallback", bare_prompt: bool = False, paraphrase_prompts: int = 0) -> dict:
    """The settings that made an edit: ``model`` is the edit module's hyper-parameters. A
    ``subject_site``, ``bare_prompt``, ``paraphrase_prompts``, ``first_token_weight``, ``optimizer``,
    ``lr_schedule`` or ``drop_converged`` other than the default is recorded with the options it reads (records of
    default runs stay as before)."""
    return {
        "method": "lu-lafn",
        "backbone": str(model["backbone"]),
        "dtype": dtype_name(model["dtype"]),
        "layers": sorted(int(i) for i in model["layers"]),
        "site": model["site"],
        "lr": float(model["lr"]),
        "lambda_target": float(model["lambda_target"]),
        "lambda_kl": float(model["lambda_kl"]),
        "stop_loss": float(model["stop_loss"]),
        "stop_rule": model.get("stop_rule", "mean"),
        "language_weighting": model.get("language_weighting", "uniform"),
        "max_steps": int(max_steps),
        "languages": list(languages),
        "num_prefixes": int(num_prefixes),
        "prefix_length": int(prefix_length),
        "seed": int(seed),
        "paraphrases": paraphrases,
        "beta": None if beta is None else float(beta),
        "strategy": strategy,
        **({"subject_site": subject_site} if subject_site != "fallback" else {}),
        **({"bare_prompt": True} if bare_prompt else {}),
        **({"paraphrase_prompts": int(paraphrase_prompts)} if paraphrase_prompts else {}),
        **_step_options(model),
    }


def _step_options(model: Mapping[str, Any]) -> dict:
    """The answer's first-token weight, the optimizer, step-size schedule and row dropping, where
    they differ from the paper's (1, Adam, constant, every row every step), with the options each reads."""
    out: dict = {}
    if float(model.get("first_token_weight", 1.0)) != 1.0:
        out.update(first_token_weight=float(model["first_token_weight"]))
    if model.get("optimizer", "adam") != "adam":
        out.update(optimizer=model["optimizer"], lbfgs_history=int(model["lbfgs_history"]), lr_max=float(model["lr_max"]))
    schedule = model.get("lr_schedule", "constant")
    if schedule != "constant":
        out.update(lr_schedule=schedule, lr_floor=float(model["lr_floor"]))
        if schedule == "adaptive":
            out.update(lr_up=float(model["lr_up"]), lr_down=float(model["lr_down"]), lr_max=float(model["lr_max"]))
    if model.get("drop_converged", False):
        out.update(drop_converged=True, drop_below=float(model["drop_below"]), full_every=int(model["full_every"]),
                   converged_prompts=int(model["converged_prompts"]))
    return out
