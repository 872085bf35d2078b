"""The one config parser of every command, and :class:`Settings`, a parsed config in Python.

    settings = Settings.from_config("demo", overrides={"data.groups": "0:8"})
    trainer, module, datamodule = settings.instantiate()       # what ``lafn fit`` would run

Every ``lafn`` command except ``cache`` parses ``-c CONFIG --data.* --model.* --locate.* --routing.*
--trainer.* --cache_dir`` with :class:`LafnCLI` (LightningCLI), plus its own options.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lightning.pytorch.cli import LightningCLI

from lafn_lightning.callbacks import CacheExport, LogProgress, NeuronLocator

from ..editing.datamodule import EditBatchDataModule
from ..editing.module import LafnEditModule
from ..routing.settings import RENAMED, RoutingSettings, router_layer

__all__ = ["LafnCLI", "Settings", "config_dir", "resolve_config"]


def config_dir() -> Path:
    """The shipped configs (``configs/`` of the repository, packaged as ``lafn_lightning.configs``)."""
    try:
        return Path(str(resources.files("lafn_lightning.configs")))
    except ModuleNotFoundError:  # pragma: no cover - running from a source tree without install
        return Path(__file__).resolve().parents[2] / "configs"


def resolve_config(name: str | os.PathLike) -> str:
    """A config path as given, or the name of a shipped config (``demo``, ``tiny.yaml``,
    ``presets/multi_device``) when no such file exists here."""
    path = Path(name)
    if path.is_file():
        return str(path)
    for candidate in (config_dir() / path, config_dir() / f"{path}.yaml"):   # not with_suffix: llama3.1-8b
        if candidate.is_file():
            return str(candidate)
    shipped = sorted(str(p.relative_to(config_dir()).with_suffix("")) for p in config_dir().rglob("*.yaml"))
    raise FileNotFoundError(f"-c {name}: no such config file; shipped configs: {', '.join(shipped)}")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with every ``-c/--config NAME`` resolved by :func:`resolve_config`."""
    out, it = [], iter(args)
    for a in it:
        if a in ("-c", "--config"):
            out += [a, resolve_config(next(it, ""))]
        elif a.startswith("--config="):
            out.append("--config=" + resolve_config(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out


def refuse_renamed(args: Sequence[str] | Mapping[str, Any] | None) -> None:
    """Refuse, with one line naming the new key, an option the ``routing`` section replaced
    (:data:`~lafn_lightning.routing.settings.RENAMED`), given on the command line, in a config
    file (``-c``) or in a config mapping.

        refuse_renamed(["fit", "--export.router_threshold", "0.9"])   # ValueError: ... routing.threshold
    """
    import yaml

    def check(config: Any, prefix: str = "") -> None:
        if not isinstance(config, Mapping):
            return
        for key, value in config.items():
            name = f"{prefix}{key}"
            if name in RENAMED:
                raise ValueError(f"{name} is now {RENAMED[name]} (a top-level routing: section of the config)")
            if isinstance(value, Mapping) and name in ("export", "fit"):
                check(value, "" if name == "fit" else f"{name}.")

    if args is None or isinstance(args, Mapping):
        check(args or {})
        return
    it = iter(args)
    for a in it:
        if a in ("-c", "--config") or a.startswith("--config="):
            path = a.split("=", 1)[1] if "=" in a else next(it, "")
            if Path(path).is_file():
                try:
                    check(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
                except yaml.YAMLError:
                    pass   # the parser's own error follows
        elif a.startswith("--export.router_"):
            check({a[2:].split("=", 1)[0]: None})


def preflight(settings: "Settings", *, check_cache: bool = True) -> None:
    """Refuse bad settings before any compute: the data (read and checked), the routing section
    and, for a command that edits (``check_cache``), the step budget and the target cache (a
    directory, readable manifest, same edit settings, router keys built with the same key
    settings)."""
    layers = settings.model.get("layers")
    if layers is not None and not len(layers):
        raise ValueError("model.layers: empty list; give the decoder layers to edit, e.g. [1, 2]")
    routing = settings.routing
    groups = settings.load_groups()
    if check_cache:  # a command that edits into the cache
        max_steps = settings.trainer.get("max_steps", -1)
        if max_steps is None or int(max_steps) < 1:
            raise ValueError(f"trainer.max_steps={max_steps}: the step budget of an edit batch must be >= 1 "
                             "(a fit that trains nothing exports nothing)")
        from ..cache import check_target

        check_target(settings.cache_dir, None, settings.record(groups[0].languages),
                     routing=routing if routing.keys else None)


def check_checkpoint(ckpt_path: str | None) -> None:
    """Refuse a checkpoint that does not exist or that torch cannot load with ``weights_only``."""
    if ckpt_path:
        import torch

        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path {ckpt_path}: no such checkpoint file")
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
            raise ValueError(f"ckpt_path {ckpt_path}: not a checkpoint that can be loaded safely "
                             f"(weights only): {str(exc).splitlines()[0][:200]}") from None


class LafnCLI(LightningCLI):
    """LightningCLI over :class:`LafnEditModule` and :class:`EditBatchDataModule`, with the
    ``locate``, ``export`` and ``progress`` callbacks, the ``routing`` section and
    ``--cache_dir``; with ``command``, that function's own arguments are added at the top level;
    ``instantiate=False`` only parses."""

    def __init__(self, args=None, *, run: bool = True, command: Callable | None = None, instantiate: bool = True,
                 check_cache: bool = True, **kwargs) -> None:
        self.command, self._instantiate, self._check_cache = command, instantiate, check_cache
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            super().__init__(LafnEditModule, EditBatchDataModule, args=args, run=run,
                             save_config_kwargs={"overwrite": True}, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(NeuronLocator, "locate")
        parser.add_lightning_class_args(CacheExport, "export")
        parser.add_lightning_class_args(LogProgress, "progress")
        parser.add_class_arguments(RoutingSettings, "routing")
        parser.add_argument("--cache_dir", type=str, default="edit_cache", help="the edit cache directory")
        parser.link_arguments("cache_dir", "export.cache_dir")
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.dtype", "data.dtype")
        parser.link_arguments("model.layers", "routing.layer", compute_fn=router_layer)
        parser.link_arguments("model.layers", "data.router_layer", compute_fn=router_layer)
        parser.link_arguments("routing", "export.routing", apply_on="instantiate")
        if self.command is not None:
            parser.add_function_arguments(self.command, skip={"settings"})

    def parse_arguments(self, parser, args) -> None:
        refuse_renamed(sys.argv[1:] if args is None else args)   # before the parser's own error
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        sub = self.config.get("subcommand")
        check_checkpoint((self.config[sub] if sub else self.config).get("ckpt_path"))  # before LightningCLI reads it
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Check what can be checked before the backbone is loaded (one-line errors)."""
        config = (self.config[self.subcommand] if self.subcommand else self.config).as_dict()
        preflight(Settings(config), check_cache=self._check_cache and not config.get("no_edit"))  # evaluate --no_edit edits nothing

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()


class Settings:
    """A parsed config: the ``trainer``, ``model``, ``data``, ``locate``, ``export``,
    ``progress``, ``routing`` sections and ``cache_dir`` (plain dicts, as ``--print_config`` shows them)."""

    SECTIONS = ("seed_everything", "trainer", "model", "data", "locate", "export", "progress", "routing",
                "cache_dir", "optimizer", "lr_scheduler")

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = {k: copy.deepcopy(v) for k, v in config.items() if k in self.SECTIONS}

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, *configs: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                    args: Sequence[str] = ()) -> "Settings":
        """Parse config files (paths or shipped names) plus dotted ``overrides``
        (``{"data.groups": "0:8", "model.dtype": "bfloat16"}``) and command-line style ``args``."""
        argv = [a for c in configs for a in ("-c", str(c))] + list(args)
        for key, value in (overrides or {}).items():
            argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        cli = LafnCLI(resolve_config_args(argv), run=False, instantiate=False, check_cache=False)
        return cls.from_namespace(cli)

    @classmethod
    def from_namespace(cls, cli: LafnCLI) -> "Settings":
        """The settings of a parsed :class:`LafnCLI` (link targets dropped: they are recomputed)."""
        import yaml

        return cls(yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {})

    def replace(self, **sections: Mapping[str, Any] | Any) -> "Settings":
        """A copy with some keys changed: ``settings.replace(data={"groups": [3, 4]}, cache_dir="c")``."""
        new = Settings(self.config)
        for section, value in sections.items():
            if isinstance(value, Mapping) and isinstance(new.config.get(section), dict):
                new.config[section] = {**new.config[section], **value}
            else:
                new.config[section] = value
        return new

    # ---- reading ---------------------------------------------------------------------------------
    def __getitem__(self, section: str) -> Any:
        return self.config[section]

    @property
    def cache_dir(self) -> Path:
        return Path(self.config["cache_dir"])

    @property
    def model(self) -> dict:
        return self.config["model"]

    @property
    def data(self) -> dict:
        return self.config["data"]

    @property
    def locate(self) -> dict:
        return self.config["locate"]

    @property
    def trainer(self) -> dict:
        return self.config["trainer"]

    @property
    def routing(self) -> RoutingSettings:
        """The ``routing`` section (checked: one-line errors), its layer the first of ``model.layers``."""
        given = {k: v for k, v in (self.config.get("routing") or {}).items() if k != "layer"}
        return RoutingSettings(**given, layer=router_layer(self.model.get("layers")))

    def load_groups(self):
        """The edit groups the ``data`` section selects (no backbone needed); records that cannot be
        edited are left out (``data.strict: true``: refused), see :meth:`load_selection`."""
        return self.load_selection().groups

    def load_selection(self):
        """The groups the ``data`` section selects and the records skipped, with their reasons
        (:class:`lafn_lightning.data.selection.Selection`)."""
        from ..data.selection import select

        d = self.data
        return select(d.get("dataset"), d.get("format", "auto"), d.get("languages"), d.get("groups"),
                      d.get("paraphrases"), check=d.get("check_subjects", True), strict=bool(d.get("strict", False)))

    def record(self, languages) -> dict:
        """How edits made with these settings are recorded in a cache (:mod:`..editing.record`)."""
        from ..editing.record import edit_record

        d, loc = self.data, self.locate
        return edit_record({**self.model, "dtype": self.model.get("dtype", "float32")}, languages=languages,
                           num_prefixes=d["num_prefixes"], prefix_length=d["prefix_length"], seed=d["seed"],
                           paraphrases=d.get("paraphrases"), beta=loc.get("beta"), strategy=loc.get("strategy"),
                           max_steps=self.trainer.get("max_steps"), subject_site=d.get("subject_site", "fallback"),
                           bare_prompt=bool(d.get("bare_prompt", False)),
                           paraphrase_prompts=int(d.get("paraphrase_prompts", 0)))

    # ---- running ---------------------------------------------------------------------------------
    def cli(self, **kwargs) -> LafnCLI:
        """A :class:`LafnCLI` parsed from these settings (``run=False``)."""
        return LafnCLI(args=copy.deepcopy(self.config), run=False, **kwargs)

    def instantiate(self):
        """``(trainer, module, datamodule)`` exactly as ``lafn fit`` builds them."""
        cli = self.cli()
        return cli.trainer, cli.model, cli.datamodule
