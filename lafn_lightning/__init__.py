"""lafn_lightning: multilingual knowledge editing by locating and updating language-agnostic factual neurons.

    from lafn_lightning import EditedModel, Settings, edit_dataset, evaluate, load_groups

Imports are lazy: ``import lafn_lightning`` loads neither Lightning's trainer nor transformers.
"""
from importlib import import_module

_EXPORTS = {
    "EditGroup": "lafn_lightning.data", "LanguageEdit": "lafn_lightning.data", "load_groups": "lafn_lightning.data",
    "EditCache": "lafn_lightning.cache", "EditedModel": "lafn_lightning.inference",
    "Settings": "lafn_lightning.api", "edit_dataset": "lafn_lightning.api", "evaluate": "lafn_lightning.api",
    "match_report": "lafn_lightning.api", "plots": "lafn_lightning.api", "paraphrase": "lafn_lightning.api",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
