"""Data shipped inside the package, so a clone (or a wheel) works with nothing beside it.

    default_dataset()                       # folder of the 150 MzsRE dev records (12 languages)
    read_zsre_train("th", limit=2000)       # [(question, answer), ...] of other zsRE facts

Sources and licence notes: the README.md in each folder.
"""
from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

from .records import normalize_language

__all__ = ["default_dataset", "zsre_train_file", "read_zsre_train"]


def _folder(name: str) -> Path:
    return Path(str(resources.files("lafn_lightning.data") / name))


def default_dataset() -> str:
    """The MzsRE dev records shipped with the package (the first 150 test records)."""
    return str(_folder("mzsre_dev"))


def zsre_train_file(language: str) -> Path:
    """The packaged zsRE training facts of one MzsRE language (gzip, ``question<TAB>answer``)."""
    lang = normalize_language(language, where="language")
    return _folder("zsre_train") / f"zsre_mend_train_{lang}_10000.txt.gz"


def read_zsre_train(language: str, limit: int | None = None) -> list[tuple[str, str]]:
    """The first ``limit`` (default all 10,000) zsRE training facts in ``language`` as
    ``(question, answer)``; item i is the same fact in every language (35 lines per non-English
    file carry no answer: their answer is ``""``, kept so the alignment holds). Never evaluation data."""
    path = zsre_train_file(language)
    out: list[tuple[str, str]] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            question, _, answer = line.rstrip("\n").partition("\t")
            out.append((" ".join(question.split()), answer.strip()))
    return out

