"""The ``lafn`` command: a table of subcommands over the plain functions of :mod:`lafn_lightning.api`.

    lafn --help                             # the subcommands, one line each
    lafn fit -c demo                        # one edit batch (LightningCLI) -> ./edit_cache
    lafn edit-dataset -c demo --data.groups null --edit_batch_size 16
    lafn evaluate -c demo --data.groups 0:50 --output runs/enzh/results.json
    lafn cache list edit_cache
    lafn miss-report runs/enzh/results.json --metric generality --output runs/enzh/misses.md
    lafn compare runs/preset/results.json runs/lever/results.json --metric generality

Every subcommand but ``cache`` and the commands over a results file (``PLAIN``) takes ``-c CONFIG`` (a path or a shipped name)
and the ``--data.* --model.* --locate.* --routing.* --trainer.* --cache_dir`` options of the config sections it reads
(``READS``); ``--help`` and ``--print_config`` work on each. One name per concept: an option means the same
in every command, and the names of ``RENAMED`` are refused with the one to use. Bad input: one line on
stderr, exit 2 (``LAFN_DEBUG=1``: traceback).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import functools
import os
import re
import shlex
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
    "miss-report": "lafn_lightning.api.analysis:miss_report",
    "compare": "lafn_lightning.api.analysis:compare",
    "paraphrase": "lafn_lightning.api.corpus:paraphrase",
    "cache": "lafn_lightning.cli.cache:cache_command",
}
#: the one line of each subcommand in ``lafn --help`` (every entry of COMMANDS has one)
SUMMARIES = {
    "fit": "edit one edit batch (data.groups) and export it to the edit cache (LightningCLI)",
    "edit-dataset": "edit every selected group in batches of --edit_batch_size, resumably, into one cache",
    "evaluate": "edit what the cache lacks, then score Reliability/Generality/Locality/Portability",
    "match-report": "how often each subject matcher finds a group's subject (and falsely fires)",
    "miss-report": "split each miss of a metric per language: not routed / other group / other token / no answer",
    "compare": "two evaluations of the same groups: scores per language, differences, bootstrap interval",
    "plots": "paper Figures 1 and 4 (factual neurons per layer, neuron-set differences); --results: scores per language",
    "paraphrase": "write the locating corpus: paraphrases of each edit question by an instruct model",
    "plan": "size a run before starting it: predicted peak memory, FLOPs, steps and hours",
    "cache": "list, show, delete, merge, verify, gc and stats of an edit cache",
}
#: commands over files, not a config: positional arguments and ``--option`` from the function's
#: signature and the Args section of its docstring (no ``-c CONFIG``)
PLAIN = ("miss-report", "compare")
#: LightningCLI subcommands this project does not offer (editing is ``fit``; scoring is ``evaluate``)
NOT_OFFERED = ("validate", "test", "predict")
#: parameters of an API function that the command line does not set
NOT_ON_COMMAND_LINE = frozenset({"settings", "generate"})
#: the config sections (and top-level keys) a command reads; None: all of them. A config file may hold
#: the others (configs are shared by every command): they are read and ignored, but ``--help`` does not
#: show them and the command line refuses them
READS: dict[str, tuple[str, ...] | None] = {
    "edit-dataset": None,
    "evaluate": None,
    "plan": ("model", "data", "trainer"),
    "match-report": ("model", "data", "routing"),
    "plots": ("model", "data", "locate"),
    "paraphrase": ("data", "seed_everything"),
}
#: option names refused with the name every command uses for the same thing: command -> {old: new}
RENAMED = {
    "plots": {"--out": "--output", "--beta": "--locate.beta"},
    "paraphrase": {"--dtype": "--instruct_dtype (the instruct model's dtype; --model.dtype is the edited backbone's)",
                   "--seed": "--seed_everything"},
}
#: errors that describe bad input or a place that cannot be read or written (OSError: a full disk,
#: a read-only mount; its message names the file): one line, no traceback (LAFN_DEBUG=1 shows it)
USER_ERRORS = (DataError, CacheError, UnsupportedBackbone, OSError, ValueError, LockTimeout)


def _function(name: str):
    module, fn = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_command(name: str, argv: list[str]):
    """Parse ``argv`` with the shared parser plus the command's own options, then call it."""
    from ..api.settings import Settings, resolve_config_args

    fn = _function(name)
    doc = inspect.getdoc(fn) or ""
    check_option_names(name, argv)
    cli = _command_cli()(resolve_config_args(argv), run=False, instantiate=False, command=_command_line_view(fn),
                         reads=READS.get(name), check_cache=name in ("edit-dataset", "evaluate"),
                         auto_configure_optimizers=False,
                         parser_kwargs={"prog": f"lafn {name}", "description": doc.split("\n\n")[0]})
    own = {p: cli.config[p] for p in inspect.signature(fn).parameters if p not in NOT_ON_COMMAND_LINE}
    return fn(Settings.from_namespace(cli), **own)


def check_option_names(name: str, argv: list[str]) -> None:
    """Refuse, before anything is parsed or computed, an option of ``RENAMED`` (naming the one to use)
    and an option of a config section the command does not read (``READS``)."""
    reads = READS.get(name)
    for arg in argv:
        if not arg.startswith("--"):
            continue
        option = arg.split("=", 1)[0]
        new = RENAMED.get(name, {}).get(option)
        if new:
            raise ValueError(f"{name} {option}: the option is {new}")
        section = option[2:].split(".", 1)[0]
        if reads is not None and section in _SECTIONS and section not in reads:
            raise ValueError(f"{name} {option}: {name} does not read {section} "
                             f"(it reads {', '.join(reads)}; `lafn {name} --help`)")


#: the config sections and top-level keys of every config command's parser
_SECTIONS = ("seed_everything", "trainer", "model", "data", "locate", "routing", "export", "progress", "cache_dir")


def _command_cli():
    """:class:`LafnCLI` whose ``--help`` shows only the sections in ``reads`` (every action stays in the
    parser, so that a shared config file holding the other sections still parses)."""
    from ..api.settings import LafnCLI

    class CommandCLI(LafnCLI):
        def __init__(self, *args, reads: tuple[str, ...] | None = None, **kwargs) -> None:
            self.reads = reads
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            if self.reads is None:
                return
            hidden = {s for s in _SECTIONS if s not in self.reads}
            for action in parser._actions:
                link = " ".join(action.option_strings)    # a link: "model.backbone --> data.backbone"
                names = {w.split(".")[0] for w in re.findall(r"[\w.]+", link)} if "-->" in link else set()
                if action.dest.split(".", 1)[0] in hidden or names & hidden:
                    action.help = argparse.SUPPRESS
            parser._action_groups[:] = [g for g in parser._action_groups if not g._group_actions
                                        or any(a.help is not argparse.SUPPRESS for a in g._group_actions)]

    return CommandCLI


def _arg_help(doc: str) -> dict[str, str]:
    """``{argument: text}`` from the Args section of a Google-style docstring."""
    helps: dict[str, str] = {}
    lines = doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []
    name = None
    for line in lines[1:]:
        if line.strip() and not line.startswith(" "):
            break
        head = line.strip().split(":", 1)
        if line.startswith("    ") and not line.startswith("     ") and len(head) == 2 and head[0].isidentifier():
            name, helps[head[0]] = head[0], head[1].strip()
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


def run_plain(name: str, argv: list[str]):
    """Run a command of ``PLAIN``: parameters without a default are positional, the others
    ``--name VALUE`` (typed as their default; ``None`` defaults take a string)."""
    fn = _function(name)
    doc = inspect.getdoc(fn) or ""
    helps = _arg_help(doc)
    parser = argparse.ArgumentParser(prog=f"lafn {name}", description=doc.split("\n\n")[0])
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty:
            parser.add_argument(p.name, help=helps.get(p.name))
        else:
            kind = type(p.default) if p.default is not None else str
            parser.add_argument(f"--{p.name}", type=kind, default=p.default,
                                help=helps.get(p.name, "") + ("" if "default" in helps.get(p.name, "")
                                                              else f" (default: {p.default})"))
    return fn(**vars(parser.parse_args(argv)))


def _command_line_view(fn):
    """``fn`` with the parameters the command line does not set (``NOT_ON_COMMAND_LINE``) hidden
    from the parser, so that ``--help`` shows only the options the command reads."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def view(*args, **kwargs):  # pragma: no cover - only parsed, never called
        return fn(*args, **kwargs)

    view.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values()
                                                 if p.name not in NOT_ON_COMMAND_LINE or p.name == "settings"])
    del view.__wrapped__
    return view


def help_text() -> str:
    """``lafn --help``: the subcommands, one line each."""
    width = max(map(len, SUMMARIES))
    lines = ["usage: lafn COMMAND [-c CONFIG] [--data.* --model.* --locate.* --routing.* --trainer.* --cache_dir DIR] ...",
             "",
             "Multilingual knowledge editing by locating and updating language-agnostic factual neurons (LU-LAFNs).",
             "",
             "commands:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in ("fit", *[c for c in SUMMARIES if c != "fit"])]
    lines += ["",
              "`lafn COMMAND --help` shows a command's options; `--print_config` the resolved config.",
              "Shipped configs by name: -c demo, -c tiny, -c llama3.1-8b, -c qwen2-7b, -c bloomz-7b1-mt,",
              "-c presets/twelve_languages, -c presets/paraphrase_prompts, -c presets/fp32, -c presets/multi_device.",
              "Docs: README.md, docs/."]
    return "\n".join(lines)


def _next_hint(argv: list[str], cache: str) -> str:
    """What to run after ``lafn fit``: the same configs and data/model/locate options the user gave."""
    keep, it = [], iter(argv)
    for a in it:
        if a in ("-c", "--config"):
            keep += [a, next(it, "")]
        elif a.startswith(("--config=", "--data.", "--model.", "--locate.", "--seed_everything")):
            keep.append(a)
            if "=" not in a:
                keep.append(next(it, ""))
    args = shlex.join(keep) if keep else "-c <config>"
    return (f"[lafn] done. Next:\n"
            f"  lafn cache list {shlex.quote(cache)}\n"
            f"  lafn evaluate {args} --cache_dir {shlex.quote(cache)} --no_edit true --output runs/results.json\n"
            f"  python -c \"from lafn_lightning import EditedModel; m = EditedModel.from_cache('{cache}')\"")


def fit(argv: list[str]) -> None:
    """``lafn fit`` over the edit module; then what to run next."""
    from ..api.settings import LafnCLI, resolve_config_args

    cli = LafnCLI(resolve_config_args(argv), auto_configure_optimizers=False)
    if cli.subcommand != "fit":
        return
    if cli.trainer.interrupted:
        print("[lafn] interrupted: nothing was exported; the cache is as it was", file=sys.stderr, flush=True)
        raise SystemExit(130)
    if not cli.trainer.fast_dev_run and cli.trainer.global_rank == 0:
        print(_next_hint(argv[1:], str(cli.config["fit"]["cache_dir"])), file=sys.stderr, flush=True)


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
        if not args or args[0] in ("-h", "--help", "help"):
            print(help_text(), file=sys.stdout if args else sys.stderr)
            sys.exit(0 if args else 2)
        if args[0] in NOT_OFFERED:
            print(f"lafn: error: '{args[0]}' is not a lafn command (editing is `lafn fit`, scoring is "
                  f"`lafn evaluate`); see `lafn --help`", file=sys.stderr)
            sys.exit(2)
        if args[0] not in ("fit", *COMMANDS):
            print(f"lafn: error: unknown command '{args[0]}'; choose from "
                  f"{', '.join(['fit', *COMMANDS])} (`lafn --help`)", file=sys.stderr)
            sys.exit(2)
        if args[0] == "cache":
            _function("cache")(args[1:])
        elif args[0] in PLAIN:
            run_plain(args[0], args[1:])
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
