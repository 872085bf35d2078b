"""Edit groups (one fact in several languages) and their readers: MzsRE, Bi-ZsRE, our JSONL.

    groups = load_groups(default_dataset(), languages=["en", "zh"], select="0:4")
    groups[0].edits["zh"].prompt, groups[0].subjects

Validated before any compute; every error is a :class:`DataError` naming file, record and
field. Formats and choices (locality prefix, leak guard, language aliases): docs/data.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..files import atomic_output


log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "MZSRE_LANGUAGES",
    "LANGUAGE_ALIASES",
    "normalize_language",
    "LanguageEdit",
    "EditGroup",
    "read_mzsre",
    "read_bizsre",
    "read_jsonl",
    "load_groups",
    "attach_paraphrases",
    "write_jsonl",
    "resolve_selection",
    "fact_digest",
]

MZSRE_LANGUAGES = ("en", "cz", "de", "du", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh")
LANGUAGE_ALIASES = {"cs": "cz", "nl": "du"}
BIZSRE_LANGUAGES = ("en", "zh")
MZSRE_PATTERN = "mzsre_test_duplicate_en{}.json"
BIZSRE_FILENAMES = ("bizsre_test.json", "bi_zsre.json")
_NQ_PREFIX = re.compile(r"^nq question:\s*", re.IGNORECASE)


class DataError(ValueError):
    """Invalid or unreadable edit data. The message names file, record index and field."""

    def __init__(self, message: str, *, file: str | None = None, index: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.file, self.index, self.field = file, index, field


def _record_error(file: str | Path, index: int, field: str, problem: str) -> DataError:
    name = Path(file).name
    return DataError(f"{name}: record {index}, field '{field}': {problem}",
                     file=name, index=index, field=field)


def normalize_language(code: str, *, where: str = "") -> str:
    """Map a language code (upstream or ISO alias, any case) to the upstream code."""
    if isinstance(code, str):
        norm = code.strip().lower()
        norm = LANGUAGE_ALIASES.get(norm, norm)
        if norm in MZSRE_LANGUAGES:
            return norm
    aliases = ", ".join(f"{a}->{b}" for a, b in LANGUAGE_ALIASES.items())
    prefix = f"{where}: " if where else ""
    raise DataError(f"{prefix}unknown language code {code!r}; known codes: "
                    f"{', '.join(MZSRE_LANGUAGES)} (aliases {aliases})", field=where or None)


@dataclass(frozen=True)
class LanguageEdit:
    """One language's side of an edit group."""

    language: str
    subject: str
    prompt: str
    target: str
    rephrase: str | None = None
    locality_prompt: str | None = None
    locality_answer: str | None = None
    portability_prompt: str | None = None
    portability_answer: str | None = None
    paraphrases: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.paraphrases, tuple):
            object.__setattr__(self, "paraphrases", tuple(self.paraphrases))

    @property
    def probes(self) -> tuple[str, ...]:
        """The evaluation questions (rephrase, locality, portability) that are present."""
        return tuple(p for p in (self.rephrase, self.locality_prompt, self.portability_prompt)
                     if p is not None)


@dataclass(frozen=True)
class EditGroup:
    """One fact edited in several languages at once."""

    group_id: str
    index: int
    edits: dict[str, LanguageEdit]

    def __post_init__(self):
        for lang, edit in self.edits.items():
            if edit.language != lang:
                raise ValueError(f"{self.group_id}: edit under key {lang!r} has language "
                                 f"{edit.language!r}")

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.edits)

    @property
    def subjects(self) -> tuple[str, ...]:
        """Distinct subjects over all languages, longest first (ties: language order)."""
        distinct = list(dict.fromkeys(e.subject for e in self.edits.values()))
        return tuple(sorted(distinct, key=len, reverse=True))

    @property
    def digest(self) -> str:
        """A content hash of the fact as edited (per language: subject, question, new answer),
        16 hex digits: two groups with one id but another digest are different facts (the
        edit cache's merge refuses to mix them).

            EditGroup("g", 0, {"en": LanguageEdit("en", "Paris", "Where is Paris?", "Rome")}).digest
        """
        return fact_digest({l: {"subject": e.subject, "prompt": e.prompt, "target": e.target}
                            for l, e in self.edits.items()})


def fact_digest(edits: dict) -> str:
    """16 hex digits of sha256 over ``{language: {subject, prompt, target}}`` as canonical JSON.

        fact_digest({"en": {"subject": "Paris", "prompt": "Where is Paris?", "target": "Rome"}})
    """
    core = {l: {k: edits[l].get(k) for k in ("subject", "prompt", "target")} for l in sorted(edits)}
    return hashlib.sha256(json.dumps(core, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- helpers

# our field -> the upstream (MzsRE / Bi-ZsRE) key, for messages
_UPSTREAM_KEYS = {
    "subject": "subject", "prompt": "src", "target": "alt", "rephrase": "rephrase",
    "locality_prompt": "loc", "locality_answer": "loc_ans",
    "portability_prompt": "portability.New Question",
    "portability_answer": "portability.New Answer",
}
_WHAT = {
    "subject": "subject", "prompt": "prompt", "target": "answer", "rephrase": "rephrase question",
    "locality_prompt": "locality question", "locality_answer": "locality answer",
    "portability_prompt": "portability question", "portability_answer": "portability answer",
}
_JSONL_KEYS = frozenset(_WHAT) | {"paraphrases"}


def _probe_key(text: str) -> str:
    """Normal form for the leak guard: NQ prefix removed, whitespace collapsed, casefolded."""
    return " ".join(_NQ_PREFIX.sub("", text.strip()).split()).casefold()


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found", file=path.name)
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}", file=path.name) from exc


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}: malformed JSON at line {exc.lineno}, column {exc.colno}: "
                        f"{exc.msg}", file=path.name) from exc


def _read_jsonl_objects(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; blank lines are skipped and not counted as records."""
    objects = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _record_error(path, len(objects), "(line)", f"malformed JSON on line "
                                f"{lineno}, column {exc.colno}: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise _record_error(path, len(objects), "(record)", f"line {lineno}: expected an "
                                f"object, got {type(obj).__name__}")
        objects.append(obj)
    return objects


def _read_json_list(path: Path) -> list:
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of records, got "
                        f"{type(data).__name__}", file=path.name)
    return data


def _text(value: Any, file: Path, index: int, field: str, what: str, *,
          required: bool) -> str | None:
    if value is None:
        if required:
            raise _record_error(file, index, field, "missing required field")
        return None
    if not isinstance(value, str):
        raise _record_error(file, index, field, f"expected a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise _record_error(file, index, field, f"empty {what}")
    return value


def _check_pairs(row: dict, file: Path, index: int, name: dict[str, str]) -> None:
    for q, a in (("locality_prompt", "locality_answer"),
                 ("portability_prompt", "portability_answer")):
        if (row[q] is None) != (row[a] is None):
            missing = q if row[q] is None else a
            present = a if missing == q else q
            raise _record_error(file, index, name[missing],
                                f"missing while '{name[present]}' is present")


def _parse_upstream_block(record: Any, lang: str, file: Path, index: int) -> dict:
    """Validate one MzsRE/Bi-ZsRE language block; return our field names -> stripped text."""
    if not isinstance(record, dict):
        raise _record_error(file, index, "(record)",
                            f"expected an object, got {type(record).__name__}")
    block = record.get(lang)
    if block is None:
        raise _record_error(file, index, lang, "missing language block")
    if not isinstance(block, dict):
        raise _record_error(file, index, lang, f"expected an object, got {type(block).__name__}")
    port = block.get("portability")
    if port is not None and not isinstance(port, dict):
        raise _record_error(file, index, f"{lang}.portability",
                            f"expected an object with 'New Question' and 'New Answer', got "
                            f"{type(port).__name__}")
    port = port or {}
    raw = {"subject": block.get("subject"), "prompt": block.get("src"),
           "target": block.get("alt"), "rephrase": block.get("rephrase"),
           "locality_prompt": block.get("loc"), "locality_answer": block.get("loc_ans"),
           "portability_prompt": port.get("New Question"),
           "portability_answer": port.get("New Answer")}
    names = {k: f"{lang}.{v}" for k, v in _UPSTREAM_KEYS.items()}
    row = {k: _text(v, file, index, names[k], _WHAT[k],
                    required=k in ("subject", "prompt", "target")) for k, v in raw.items()}
    if row["locality_prompt"] is not None:
        row["locality_prompt"] = _NQ_PREFIX.sub("", row["locality_prompt"])
        if not row["locality_prompt"]:
            raise _record_error(file, index, names["locality_prompt"],
                                "empty locality question after the 'nq question:' prefix")
    _check_pairs(row, file, index, names)
    return row


def resolve_selection(select: Any, n: int, file: Path) -> list[int]:
    """The one group-selection syntax: ``None``/``":"``/``"all"`` (every record), ``"start:stop[:step]"``,
    an index, or a list of indices (source record indices; a list keeps its order)."""
    if isinstance(select, str) and select.strip().lower() in ("", ":", "all", "none", "null"):
        select = None
    if select is None:
        return list(range(n))
    if isinstance(select, str):
        parts = select.strip().split(":")
        try:
            if len(parts) == 1:
                select = [int(parts[0])]
            elif len(parts) in (2, 3):
                select = slice(*(int(p) if p.strip() else None for p in parts))
            else:
                raise ValueError
        except ValueError:
            raise DataError(f"{file.name}: field 'select': invalid selection {select!r}; "
                            "expected 'start:stop[:step]', an index, or a list of indices",
                            file=file.name, field="select") from None
    if isinstance(select, slice):
        if select.step == 0:
            raise DataError(f"{file.name}: field 'select': slice step cannot be zero",
                            file=file.name, field="select")
        return list(range(n))[select]
    if isinstance(select, int) and not isinstance(select, bool):
        select = [select]
    if isinstance(select, (str, bytes)) or not isinstance(select, Iterable):
        raise DataError(f"{file.name}: field 'select': unsupported selection {select!r}",
                        file=file.name, field="select")
    indices, seen = [], set()
    for i in select:
        if not isinstance(i, int) or isinstance(i, bool):
            raise DataError(f"{file.name}: field 'select': index {i!r} is not an integer",
                            file=file.name, field="select")
        if not 0 <= i < n:
            raise _record_error(file, i, "select", f"index out of range: the file has {n} "
                                f"records (valid 0..{n - 1})")
        if i in seen:
            raise _record_error(file, i, "select", "index selected twice")
        seen.add(i)
        indices.append(i)
    return indices


def _resolve_languages(languages: Sequence[str] | str | None, available: Sequence[str],
                       source: Path) -> list[str]:
    if languages is None:
        return [l for l in MZSRE_LANGUAGES if l in available]
    if isinstance(languages, str):
        languages = languages.split(",")
    wanted = list(dict.fromkeys(normalize_language(l, where="languages") for l in languages))
    if not wanted:
        raise DataError("languages: empty language list", field="languages")
    missing = [l for l in wanted if l not in available]
    if missing:
        raise DataError(f"{source.name}: language(s) {', '.join(missing)} not available here "
                        f"(available: {', '.join(available)})", file=source.name,
                        field="languages")
    return wanted


def _guard_leaks(rows: list[dict]) -> tuple[list[dict], int]:
    """Drop paraphrases equal to any probe of the group's languages; return rows, #dropped."""
    probes = {_probe_key(r[k]) for r in rows
              for k in ("rephrase", "locality_prompt", "portability_prompt") if r[k]}
    dropped = 0
    for r in rows:
        kept = []
        for p in dict.fromkeys(r["paraphrases"]):
            if _probe_key(p) in probes:
                dropped += 1
            else:
                kept.append(p)
        r["paraphrases"] = kept
    return rows, dropped


def _groups_from_rows(rows: list[dict]) -> list[EditGroup]:
    """Build groups from per-language rows (group order and language order kept)."""
    groups: dict[str, tuple[int, dict[str, LanguageEdit]]] = {}
    for row in rows:
        row = dict(row)
        gid, index = row.pop("group_id"), row.pop("index")
        row["paraphrases"] = tuple(row.get("paraphrases") or ())
        groups.setdefault(gid, (index, {}))[1][row["language"]] = LanguageEdit(**row)
    return [EditGroup(gid, index, edits) for gid, (index, edits) in groups.items()]


# --------------------------------------------------------------------------- readers

def _mzsre_files(path: Path) -> tuple[dict[str, Path], list[str]]:
    """Language -> pair file, and the languages whose files exist (a directory or one file)."""
    if path.is_dir():
        files = {l: path / MZSRE_PATTERN.format(l) for l in MZSRE_LANGUAGES[1:]}
        present = [l for l, f in files.items() if f.is_file()]
        if not present:
            raise DataError(f"{path}: no {MZSRE_PATTERN.format('{XX}')} files found",
                            file=str(path))
        return files, ["en", *present]
    if not path.is_file():
        raise DataError(f"{path}: file or directory not found", file=path.name)
    m = re.fullmatch(r"mzsre_test_duplicate_en(\w+)\.json", path.name)
    lang = m.group(1) if m and m.group(1) in MZSRE_LANGUAGES[1:] else None
    if lang is None:  # a renamed pair file: take the pair language from record 0
        data = _read_json_list(path)
        keys = [k for k in (data[0] if data and isinstance(data[0], dict) else {}) if k != "en"]
        if len(keys) != 1:
            raise DataError(f"{path.name}: record 0, field '(record)': cannot tell the pair "
                            f"language from keys {keys}", file=path.name, index=0)
        lang = normalize_language(keys[0], where=f"{path.name}: record 0")
    return {lang: path}, ["en", lang]


def read_mzsre(path, languages=None, select=None) -> list[EditGroup]:
    """Read MzsRE pair files (a directory or one ``mzsre_test_duplicate_en{XX}.json``)."""
    path = Path(path)
    files, available = _mzsre_files(path)
    # a directory may lack some pair files: explicit languages then fail on the missing file
    wanted = _resolve_languages(languages, available if len(files) == 1 or languages is None
                                else MZSRE_LANGUAGES, path)
    pair_langs = [l for l in wanted if l != "en"] or [available[1]]
    parsed: dict[str, list[dict]] = {}  # language -> validated rows by record index
    english: list[dict] = []
    english_file: Path | None = None
    for lang in pair_langs:
        file = files[lang]
        records = _read_json_list(file)
        if english_file is not None and len(records) != len(english):
            raise _record_error(file, min(len(records), len(english)), "(record count)",
                                f"file has {len(records)} records but {english_file.name} "
                                f"has {len(english)}")
        en_rows = [_parse_upstream_block(r, "en", file, i) for i, r in enumerate(records)]
        if english_file is None:
            english, english_file = en_rows, file
        for i, (a, b) in enumerate(zip(en_rows, english)):
            for key in a:
                if a[key] != b[key]:
                    raise _record_error(file, i, f"en.{_UPSTREAM_KEYS[key]}",
                                        f"English block differs from {english_file.name} "
                                        f"({a[key]!r} vs {b[key]!r})")
        if lang in wanted:
            parsed[lang] = [_parse_upstream_block(r, lang, file, i) for i, r in enumerate(records)]
    parsed["en"] = english
    indices = resolve_selection(select, len(english), english_file)
    rows = [{"group_id": f"mzsre:{i}", "index": i, "language": l, **parsed[l][i],
             "paraphrases": []} for i in indices for l in wanted]
    return _groups_from_rows(rows)


def read_bizsre(path, languages=None, select=None) -> list[EditGroup]:
    """Read the Bi-ZsRE test file (``bizsre_test.json``: a list of {"en", "zh"} records)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in BIZSRE_FILENAMES if (path / n).is_file()]
        if not found:
            raise DataError(f"{path}: no {' or '.join(BIZSRE_FILENAMES)} found", file=str(path))
        path = found[0]
    records = _read_json_list(path)
    wanted = _resolve_languages(languages, BIZSRE_LANGUAGES, path)
    parsed = {l: [_parse_upstream_block(r, l, path, i) for i, r in enumerate(records)]
              for l in wanted}
    indices = resolve_selection(select, len(records), path)
    rows = [{"group_id": f"bizsre:{i}", "index": i, "language": l, **parsed[l][i],
             "paraphrases": []} for i in indices for l in wanted]
    return _groups_from_rows(rows)


def _parse_jsonl_block(block: Any, lang: str, file: Path, index: int) -> dict:
    field = f"edits.{lang}"
    if not isinstance(block, dict):
        raise _record_error(file, index, field, f"expected an object, got {type(block).__name__}")
    for key in block:
        if key not in _JSONL_KEYS:
            raise _record_error(file, index, f"{field}.{key}", "unknown field (expected one of "
                                f"{', '.join(sorted(_JSONL_KEYS))})")
    names = {k: f"{field}.{k}" for k in _WHAT}
    row = {k: _text(block.get(k), file, index, names[k], _WHAT[k],
                    required=k in ("subject", "prompt", "target")) for k in _WHAT}
    _check_pairs(row, file, index, names)
    paras = block.get("paraphrases", [])
    if not isinstance(paras, list):
        raise _record_error(file, index, f"{field}.paraphrases",
                            f"expected a list of strings, got {type(paras).__name__}")
    row["paraphrases"] = [_text(p, file, index, f"{field}.paraphrases[{j}]", "paraphrase",
                                required=True) for j, p in enumerate(paras)]
    return row


def _record_digest(edits: Any) -> str:
    """The content hash of a JSONL record's ``edits`` (any shape: validated later), so that a
    record without ``id`` gets an id naming its fact, not just its line
    (``edits:3:1f0c2a9e``): two files' ``edits.jsonl:3`` never collide in one cache."""
    if isinstance(edits, dict) and all(isinstance(b, dict) for b in edits.values()):
        return fact_digest({str(l).strip().lower(): {k: (v.strip() if isinstance(v, str) else v) for k, v in b.items()}
                            for l, b in edits.items()})
    return hashlib.sha256(json.dumps(edits, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def read_jsonl(path, languages=None, select=None) -> list[EditGroup]:
    """Read the project's JSONL format (see the module docstring)."""
    path = Path(path)
    objects = _read_jsonl_objects(path)
    wanted = None if languages is None else _resolve_languages(languages, MZSRE_LANGUAGES, path)
    rows_by_record, seen_ids = [], {}
    for index, obj in enumerate(objects):
        for key in obj:
            if key not in ("id", "edits"):
                raise _record_error(path, index, key, "unknown field (expected 'id', 'edits')")
        gid = obj.get("id")
        if gid is None:
            gid = f"{path.stem}:{index}:{_record_digest(obj.get('edits'))[:8]}"
        elif not isinstance(gid, str) or not gid.strip():
            raise _record_error(path, index, "id", "expected a non-empty string")
        gid = gid.strip()
        if gid in seen_ids:
            raise _record_error(path, index, "id", f"duplicate id {gid!r} "
                                f"(also record {seen_ids[gid]})")
        seen_ids[gid] = index
        edits = obj.get("edits")
        if not isinstance(edits, dict) or not edits:
            raise _record_error(path, index, "edits", "expected a non-empty object "
                                "{language: edit}")
        blocks: dict[str, Any] = {}
        for code, block in edits.items():
            lang = normalize_language(code, where=f"{path.name}: record {index}, field "
                                                  f"'edits.{code}'")
            if lang in blocks:
                raise _record_error(path, index, f"edits.{code}",
                                    f"language {lang!r} given twice")
            blocks[lang] = _parse_jsonl_block(block, code, path, index)
        for lang in wanted or ():
            if lang not in blocks:
                raise _record_error(path, index, f"edits.{lang}", "missing language")
        _, dropped = _guard_leaks(list(blocks.values()))  # all languages of the record
        if dropped:
            log.warning("%s: record %d: dropped %d paraphrase(s) equal to an evaluation probe",
                        path.name, index, dropped)
        rows_by_record.append([{"group_id": gid, "index": index, "language": l, **blocks[l]}
                               for l in (wanted or blocks)])
    indices = resolve_selection(select, len(rows_by_record), path)
    return _groups_from_rows([r for i in indices for r in rows_by_record[i]])


def load_groups(path, format="auto", languages=None, select=None) -> list[EditGroup]:
    """Read edit groups; ``format`` is auto, mzsre, bizsre or jsonl."""
    path = Path(path)
    if format == "auto":
        if path.is_dir():
            format = "mzsre" if any(path.glob(MZSRE_PATTERN.format("*"))) else "bizsre"
        elif path.name.startswith("mzsre_test_duplicate_"):
            format = "mzsre"
        elif path.name in BIZSRE_FILENAMES:
            format = "bizsre"
        elif path.suffix == ".jsonl":
            format = "jsonl"
        else:
            format = _format_of_records(path)
    readers = {"mzsre": read_mzsre, "bizsre": read_bizsre, "jsonl": read_jsonl}
    if format not in readers:
        raise DataError(f"format: unknown data format {format!r}; expected auto, "
                        f"{', '.join(readers)}", field="format")
    return readers[format](path, languages=languages, select=select)


def _format_of_records(path: Path) -> str:
    """``mzsre`` or ``bizsre`` for a JSON file whatever its name, from record 0: an MzsRE pair
    file pairs English with one other language; Bi-ZsRE is English and Chinese, and its English
    blocks are EasyEdit's zsRE records (with ``pred``, ``answers`` or ``cond``, which MzsRE's lack).
    An English-Chinese record without those keys is read as MzsRE (``--data.format`` overrides)."""
    if not path.is_file():
        return "bizsre"   # the reader names the missing file
    data = _read_json_list(path)
    first = data[0] if data and isinstance(data[0], dict) else {}
    others = [k for k in first if k != "en"]
    pair = LANGUAGE_ALIASES.get(others[0], others[0]) if len(others) == 1 else None
    if pair not in MZSRE_LANGUAGES:
        return "bizsre"   # the reader names what is wrong
    english = first.get("en") if isinstance(first.get("en"), dict) else {}
    if pair == "zh" and ZSRE_ONLY_KEYS & set(english):
        return "bizsre"
    return "mzsre"


#: keys of EasyEdit's zsRE records that Bi-ZsRE's English blocks keep and MzsRE's do not
ZSRE_ONLY_KEYS = frozenset({"pred", "answers", "cond"})


# --------------------------------------------------------------------------- paraphrases

def attach_paraphrases(groups: Sequence[EditGroup], path) -> list[EditGroup]:
    """Add locating-corpus paraphrases from a JSONL file of
    ``{"group_id", "language", "paraphrases": [...]}`` lines. Paraphrases equal to an
    evaluation probe of any language of the group are dropped (leak guard); unknown group
    ids and languages a group does not hold are ignored with a warning."""
    path = Path(path)
    by_id = {g.group_id: g for g in groups}
    extra: dict[str, dict[str, list[str]]] = {}
    unknown_ids, unknown_langs = [], []
    for index, obj in enumerate(_read_jsonl_objects(path)):
        gid = _text(obj.get("group_id"), path, index, "group_id", "group id", required=True)
        code = _text(obj.get("language"), path, index, "language", "language", required=True)
        lang = normalize_language(code, where=f"{path.name}: record {index}, field 'language'")
        paras = obj.get("paraphrases")
        if not isinstance(paras, list):
            raise _record_error(path, index, "paraphrases", "expected a list of strings, got "
                                f"{type(paras).__name__}")
        texts = [_text(p, path, index, f"paraphrases[{j}]", "paraphrase", required=True)
                 for j, p in enumerate(paras)]
        if gid not in by_id:
            unknown_ids.append(gid)
        elif lang not in by_id[gid].edits:
            unknown_langs.append(f"{gid}/{lang}")
        else:
            extra.setdefault(gid, {}).setdefault(lang, []).extend(texts)
    if unknown_ids:
        log.warning("%s: ignored %d line(s) for unknown group ids (e.g. %s)", path.name,
                    len(unknown_ids), ", ".join(unknown_ids[:5]))
    if unknown_langs:
        log.warning("%s: ignored %d line(s) for languages the group was not loaded with "
                    "(e.g. %s)", path.name, len(unknown_langs), ", ".join(unknown_langs[:5]))
    out, total_dropped, total_kept = [], 0, 0
    for g in groups:
        if g.group_id not in extra:
            out.append(g)
            continue
        rows = [{"language": l, "rephrase": e.rephrase, "locality_prompt": e.locality_prompt,
                 "portability_prompt": e.portability_prompt,
                 "paraphrases": [*e.paraphrases, *extra[g.group_id].get(l, [])]}
                for l, e in g.edits.items()]
        rows, dropped = _guard_leaks(rows)
        total_dropped += dropped
        total_kept += sum(len(r["paraphrases"]) for r in rows)
        edits = {r["language"]: dataclasses.replace(g.edits[r["language"]],
                                                    paraphrases=tuple(r["paraphrases"]))
                 for r in rows}
        out.append(dataclasses.replace(g, edits=edits))
    log.log(logging.WARNING if total_dropped else logging.INFO,
            "%s: attached paraphrases to %d group(s) (%d kept); dropped %d equal to an "
            "evaluation probe (leak guard)", path.name, len(extra), total_kept, total_dropped)
    return out


def write_jsonl(groups: Iterable[EditGroup], path) -> Path:
    """Write groups in the project's JSONL format (read back with :func:`read_jsonl`), atomically."""
    path = Path(path)
    with atomic_output(path, "w") as f:
        for g in groups:
            edits = {}
            for lang, e in g.edits.items():
                block: dict[str, Any] = {k: v for k, v in dataclasses.asdict(e).items()
                                         if k in _JSONL_KEYS and v not in (None, ())}
                if e.paraphrases:
                    block["paraphrases"] = list(e.paraphrases)
                edits[lang] = block
            f.write(json.dumps({"id": g.group_id, "edits": edits}, ensure_ascii=False) + "\n")
    return path
