"""The ``lafn`` command: a table of subcommands over the plain functions of :mod:`lafn_lightning.api`.

    lafn fit -c demo                        # one edit batch (LightningCLI) -> ./edit_cache
    lafn edit-dataset -c demo --data.groups null --edit_batch_size 16
    lafn evaluate -c demo --data.groups 0:50 --output runs/enzh/results.json
    lafn cache list edit_cache

Every subcommand but ``cache`` takes ``-c CONFIG`` (a path or a shipped name) and the same
``--data.* --model.* --locate.* --trainer.* --cache_dir`` options; ``--help`` and
``--print_config`` work on each. Bad input: one line on stderr, exit 2 (``LAFN_DEBUG=1``: traceback).
"""
from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys

from ..backbone.ffn import UnsupportedBackbone
from ..cache import CacheError
from ..data import DataError
from ..files import LockTimeout

#: subcommand -> "module:function" of the Python API it wraps (``fit`` is LightningCLI's own).
COMMANDS = {
    "edit-dataset": "lafn_lightning.api.edit:edit_dataset",
    "plan": "lafn_lightning.api.plan:plan",
    "evaluate": "lafn_lightning.api.scoring:evaluate",
    "match-report": "lafn_lightning.api.analysis:match_report",
    "plots": "lafn_lightning.api.analysis:plots",
    "paraphrase": "lafn_lightning.api.corpus:paraphrase",
    "cache": "lafn_lightning.cli.cache:cache_command",
}
#: parameters of an API function that the command line does not set
NOT_ON_COMMAND_LINE = frozenset({"settings", "generate"})
#: errors that describe bad input: one line, no traceback (LAFN_DEBUG=1 shows it)
USER_ERRORS = (DataError, CacheError, UnsupportedBackbone, FileNotFoundError, NotADirectoryError, ValueError,
               LockTimeout)


def _function(name: str):
    module, fn = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_command(name: str, argv: list[str]):
    """Parse ``argv`` with the shared parser plus the command's own options, then call it."""
    from ..api.settings import LafnCLI, Settings, resolve_config_args

    fn = _function(name)
    doc = inspect.getdoc(fn) or ""
    cli = LafnCLI(resolve_config_args(argv), run=False, instantiate=False, command=fn,
                  check_cache=name in ("edit-dataset", "evaluate"),
                  parser_kwargs={"prog": f"lafn {name}", "description": doc.split("\n\n")[0]})
    own = {p: cli.config[p] for p in inspect.signature(fn).parameters if p not in NOT_ON_COMMAND_LINE}
    return fn(Settings.from_namespace(cli), **own)


def fit(argv: list[str]) -> None:
    """``lafn fit`` (and LightningCLI's other subcommands) over the edit module; then what to run next."""
    from ..api.settings import LafnCLI, resolve_config_args

    cli = LafnCLI(resolve_config_args(argv))
    if cli.subcommand != "fit":
        return
    if cli.trainer.interrupted:
        print("[lafn] interrupted: nothing was exported; the cache is as it was", file=sys.stderr, flush=True)
        raise SystemExit(130)
    if not cli.trainer.fast_dev_run and cli.trainer.global_rank == 0:
        cache = cli.config["fit"]["cache_dir"]
        print(f"[lafn] done. Next:\n"
              f"  lafn cache list {cache}\n"
              f"  lafn evaluate -c <config> --cache_dir {cache} --no_edit true --output runs/results.json\n"
              f"  python -c \"from lafn_lightning import EditedModel; m = EditedModel.from_cache('{cache}')\"",
              file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Ctrl+C raises KeyboardInterrupt)."""


class Interrupted(BaseException):
    """SIGINT, raised as a BaseException so that Lightning re-raises it instead of exiting 1."""


def _raise(exc: type[BaseException]):
    def handler(signum, frame):
        raise exc()
    return handler


#: what an interrupted run leaves behind (every write is atomic)
_RESUME = ("every finished edit batch and evaluated group is kept, nothing half-written; "
           "rerun the same command to resume")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    previous = {sig: signal.signal(sig, _raise(exc)) for sig, exc in ((signal.SIGTERM, Terminated),
                                                                      (signal.SIGINT, Interrupted))}
    try:
        if args and args[0] == "cache":
            _function("cache")(args[1:])
        elif args and args[0] in COMMANDS:
            run_command(args[0], args[1:])
        else:
            fit(args)
    except USER_ERRORS as exc:
        if os.environ.get("LAFN_DEBUG"):
            raise
        print(f"lafn: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        print(f"lafn: interrupted (SIGINT): {_RESUME}", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"lafn: terminated (SIGTERM): {_RESUME}", file=sys.stderr)
        sys.exit(143)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
