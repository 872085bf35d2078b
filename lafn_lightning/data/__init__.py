"""Edit data: groups, readers, the packaged MzsRE dev records and zsRE training facts."""
from .packaged import default_dataset, read_zsre_train
from .records import (
    LANGUAGE_ALIASES,
    MZSRE_LANGUAGES,
    DataError,
    EditGroup,
    LanguageEdit,
    attach_paraphrases,
    load_groups,
    normalize_language,
    read_bizsre,
    read_jsonl,
    read_mzsre,
    resolve_selection,
    write_jsonl,
)

__all__ = ["LANGUAGE_ALIASES", "MZSRE_LANGUAGES", "DataError", "EditGroup", "LanguageEdit", "attach_paraphrases",
           "default_dataset", "load_groups", "normalize_language", "read_bizsre", "read_jsonl", "read_mzsre",
           "read_zsre_train", "resolve_selection", "write_jsonl"]
