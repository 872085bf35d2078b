"""The Python API under the ``lafn`` command: plain functions with documented arguments.

    from lafn_lightning.api import Settings, edit_dataset, evaluate
    settings = Settings.from_config("demo", overrides={"data.groups": "0:16"})
    edit_dataset(settings, edit_batch_size=8)
    evaluate(settings, output="runs/demo/results.json")
"""
from importlib import import_module

_EXPORTS = {"Settings": "settings", "LafnCLI": "settings", "edit_dataset": "edit", "evaluate": "scoring",
            "match_report": "analysis", "plots": "analysis", "paraphrase": "corpus"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
