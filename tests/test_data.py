"""Tests for lafn_lightning.data on the MzsRE dev subset, a Bi-ZsRE fixture and bad inputs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from lafn_lightning.data import default_dataset
from lafn_lightning.data import (
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
    write_jsonl,
)

DEV = Path(default_dataset())
FIXTURES = Path(__file__).parent / "fixtures"
BIZSRE = FIXTURES / "bizsre_test.json"
PAIR = "mzsre_test_duplicate_en{}.json"


@pytest.fixture(scope="module")
def dev_groups() -> list[EditGroup]:
    return read_mzsre(DEV)


@pytest.fixture
def dev_copy(tmp_path) -> Path:
    """A writable copy of the dev directory."""
    out = tmp_path / "mzsre"
    out.mkdir()
    for f in DEV.glob("mzsre_test_duplicate_en*.json"):
        shutil.copy(f, out / f.name)
    return out


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def raises_naming(file: str, index: int, field: str, *, match: str = ""):
    """pytest.raises for a DataError whose message names file, record index and field."""
    return pytest.raises(DataError, match=_re(f"{file}: record {index}, field '{field}'") + ".*"
                         + match)


_re = re.escape


# ----------------------------------------------------------------------- dev data

def test_dev_groups_cover_all_languages(dev_groups):
    assert len(dev_groups) == 150
    assert [g.group_id for g in dev_groups[:3]] == ["mzsre:0", "mzsre:1", "mzsre:2"]
    assert [g.index for g in dev_groups] == list(range(150))
    for g in dev_groups:
        assert g.languages == MZSRE_LANGUAGES
        for lang, e in g.edits.items():
            assert e.language == lang
            assert e.subject and e.prompt and e.target
            assert e.rephrase and e.locality_prompt and e.locality_answer
            assert e.portability_prompt and e.portability_answer
            assert e.paraphrases == ()
            for value in (e.subject, e.prompt, e.target, e.rephrase, e.locality_prompt):
                assert value == value.strip()


def test_dev_record_17_content(dev_groups):
    g = dev_groups[17]
    assert g.group_id == "mzsre:17" and g.index == 17
    en, zh = g.edits["en"], g.edits["zh"]
    assert en.subject == "Mr. Smith Carries On"
    assert en.prompt == "In the film Mr. Smith Carries On, who was the star?"
    assert en.target == "James Stewart"
    assert en.portability_answer == "It's a Wonderful Life"
    assert zh.target == "詹姆斯·斯图尔特"
    assert zh.subject == "《史密斯先生继续前进》"
    # subjects: distinct, longest first
    assert len(g.subjects) == len(set(g.subjects)) == 12
    assert [len(s) for s in g.subjects] == sorted((len(s) for s in g.subjects), reverse=True)
    assert g.subjects[0] == "มิสเตอร์สมิธดำเนินการต่อไป"


def test_english_locality_prefix_removed_and_answers_stripped(dev_groups):
    raw = json.loads((DEV / PAIR.format("zh")).read_text(encoding="utf-8"))
    assert raw[0]["en"]["loc"].startswith("nq question: ")
    assert dev_groups[0].edits["en"].locality_prompt == \
        "what is the name of the last episode of spongebob"
    assert all(not g.edits["en"].locality_prompt.startswith("nq question")
               for g in dev_groups)
    assert raw[19]["en"]["alt"] == " MAT-49"
    assert dev_groups[19].edits["en"].target == "MAT-49"
    # non-English locality questions carry no prefix upstream and are kept as they are
    assert dev_groups[0].edits["zh"].locality_prompt == raw[0]["zh"]["loc"]


def test_reading_all_dev_files_reads_each_pair_file_once(monkeypatch):
    from lafn_lightning.data import records

    reads = []
    original = records._read_json_list
    monkeypatch.setattr(records, "_read_json_list", lambda path: reads.append(Path(path).name) or original(path))
    groups = read_mzsre(DEV)
    assert sorted(reads) == sorted(p.name for p in DEV.glob("mzsre_test_duplicate_en*.json"))  # 11 files, once each
    assert len(groups) == 150 and len(groups[0].languages) == 12


def test_english_is_the_same_whichever_file_it_comes_from(dev_groups):
    only_en = read_mzsre(DEV, languages=["en"])
    via_th = read_mzsre(DEV, languages=["th", "en"])
    assert [g.edits["en"] for g in only_en] == [g.edits["en"] for g in dev_groups]
    assert [g.edits["en"] for g in via_th] == [g.edits["en"] for g in dev_groups]
    assert via_th[0].languages == ("th", "en")


def test_language_subset_order_and_aliases(dev_groups):
    groups = read_mzsre(DEV, languages=["zh", "cs", "NL"])
    assert groups[5].languages == ("zh", "cz", "du")
    assert groups[5].edits["cz"] == dev_groups[5].edits["cz"]
    assert read_mzsre(DEV, languages="en,zh")[0].languages == ("en", "zh")
    # duplicates after alias mapping collapse
    assert read_mzsre(DEV, languages=["cz", "cs"])[0].languages == ("cz",)


def test_normalize_language():
    assert normalize_language("cs") == "cz"
    assert normalize_language(" NL ") == "du"
    assert normalize_language("zh") == "zh"
    assert LANGUAGE_ALIASES == {"cs": "cz", "nl": "du"}
    with pytest.raises(DataError) as exc:
        normalize_language("ja", where="data.languages")
    msg = str(exc.value)
    assert msg.startswith("data.languages: unknown language code 'ja'")
    assert ", ".join(MZSRE_LANGUAGES) in msg


def test_only_needed_files_are_read(dev_copy):
    (dev_copy / PAIR.format("de")).write_text("{ not json", encoding="utf-8")
    (dev_copy / PAIR.format("fr")).unlink()
    # the upstream folder also holds non-English pairs (e.g. cz-de): never read
    (dev_copy / "mzsre_test_duplicate_czde.json").write_text("[", encoding="utf-8")
    assert load_groups(dev_copy, languages=["cz"], select=":1")[0].languages == ("cz",)
    groups = read_mzsre(dev_copy, languages=["en", "zh", "vi"])
    assert len(groups) == 150 and groups[0].languages == ("en", "zh", "vi")
    # languages=None takes the files present, and so reaches the broken German file
    with pytest.raises(DataError, match=_re(PAIR.format("de")) + ": malformed JSON at line 1"):
        read_mzsre(dev_copy)


def test_single_pair_file(dev_groups):
    groups = read_mzsre(DEV / PAIR.format("zh"))
    assert len(groups) == 150 and groups[3].languages == ("en", "zh")
    assert groups[3].edits["zh"] == dev_groups[3].edits["zh"]
    with pytest.raises(DataError, match=r"enzh\.json: language\(s\) de not available"):
        read_mzsre(DEV / PAIR.format("zh"), languages=["de"])


@pytest.mark.parametrize("select, expected", [
    (None, list(range(150))),
    (slice(10, 20, 3), [10, 13, 16, 19]),
    ("10:20:3", [10, 13, 16, 19]),
    (":3", [0, 1, 2]),
    ("-2:", [148, 149]),
    ("7", [7]),
    ([149, 0, 42], [149, 0, 42]),
    (range(3, 5), [3, 4]),
])
def test_select_forms(select, expected):
    groups = read_mzsre(DEV, languages=["en", "zh"], select=select)
    assert [g.index for g in groups] == expected
    assert [g.group_id for g in groups] == [f"mzsre:{i}" for i in expected]


# ----------------------------------------------------------------------- Bi-ZsRE

def test_bizsre_fixture_in_upstream_layout():
    groups = read_bizsre(BIZSRE)
    assert [g.group_id for g in groups] == ["bizsre:0", "bizsre:1", "bizsre:2"]
    en, zh = groups[0].edits["en"], groups[0].edits["zh"]
    assert groups[0].languages == ("en", "zh")
    assert en.target == "2006"  # upstream " 2006", stripped
    assert en.locality_prompt == "what is the name of the last episode of spongebob"
    assert zh.target == "2006年" and zh.portability_answer == "田径"
    assert read_bizsre(FIXTURES)[1] == groups[1]  # the directory holding bizsre_test.json
    only_zh = read_bizsre(BIZSRE, languages=["zh"], select=[2])
    assert only_zh[0].languages == ("zh",) and only_zh[0].group_id == "bizsre:2"
    with pytest.raises(DataError, match="language\\(s\\) de not available"):
        read_bizsre(BIZSRE, languages=["de"])


def test_load_groups_sniffs_the_format(tmp_path, dev_groups):
    assert load_groups(DEV, languages=["en"], select=":2")[1].group_id == "mzsre:1"
    assert load_groups(DEV / PAIR.format("vi"), select=[4])[0].languages == ("en", "vi")
    assert load_groups(BIZSRE)[0].group_id == "bizsre:0"
    jsonl = write_jsonl(dev_groups[:2], tmp_path / "edits.jsonl")
    assert load_groups(jsonl) == dev_groups[:2]
    assert load_groups(BIZSRE, format="bizsre", select="1:")[0].index == 1
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_groups(BIZSRE, format="csv")


# ----------------------------------------------------------------------- JSONL

def test_jsonl_round_trip(tmp_path, dev_groups):
    groups = read_mzsre(DEV, languages=["zh", "en", "th"], select="0:5")
    groups = [g if g.index != 2 else EditGroup(g.group_id, g.index, {
        l: LanguageEdit(**{**e.__dict__, "paraphrases": (f"para {l} a", f"para {l} b")})
        for l, e in g.edits.items()}) for g in groups]
    path = write_jsonl(groups, tmp_path / "groups.jsonl")
    back = read_jsonl(path)
    assert back == groups
    assert back[2].edits["th"].paraphrases == ("para th a", "para th b")
    assert back[0].languages == ("zh", "en", "th")  # file order kept
    sub = read_jsonl(path, languages=["th"], select=[4, 1])
    assert [g.group_id for g in sub] == ["mzsre:4", "mzsre:1"]
    assert sub[0].edits["th"] == dev_groups[4].edits["th"]


def test_jsonl_defaults_aliases_and_leak_guard(tmp_path, caplog):
    path = tmp_path / "mine.jsonl"
    lines = [
        {"edits": {"en": {"subject": "Foo", "prompt": "Who made Foo?", "target": "Bar"},
                   "cs": {"subject": "Fú", "prompt": "Kdo vyrobil Fú?", "target": "Bar",
                          "rephrase": "Kdo je autorem Fú?",
                          "paraphrases": ["kdo je autorem fú? ", "Kdo stvořil Fú?"]}}},
        {"id": "custom", "edits": {"en": {"subject": "Baz", "prompt": "Where is Baz?",
                                          "target": "Qux", "locality_prompt": "What is 2+2?",
                                          "locality_answer": "4",
                                          "paraphrases": ["nq question: what is 2+2?",
                                                          "Where can Baz be found?"]}}},
    ]
    path.write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines) + "\n\n",
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lafn_lightning.data"):
        groups = read_jsonl(path)
    assert [g.group_id.rsplit(":", 1)[0] for g in groups] == ["mine:0", "custom"]   # no id: <stem>:<index>:<hash>
    assert groups[0].languages == ("en", "cz")
    assert groups[0].edits["cz"].paraphrases == ("Kdo stvořil Fú?",)
    assert groups[1].edits["en"].paraphrases == ("Where can Baz be found?",)
    assert "dropped 1 paraphrase" in caplog.text
    with raises_naming("mine.jsonl", 1, "edits.cz", match="missing language"):
        read_jsonl(path, languages=["en", "cz"])


# ----------------------------------------------------------------------- paraphrases

def test_attach_paraphrases_with_leak_guard(tmp_path, dev_groups, caplog):
    groups = read_mzsre(DEV, languages=["en", "de", "zh"], select=":3")
    g0 = groups[0]
    en, de = g0.edits["en"], g0.edits["de"]
    lines = [
        {"group_id": "mzsre:0", "language": "en", "paraphrases": [
            "Which year did the IAAF Combined Events Challenge start?",
            "  " + en.rephrase.upper() + " ",             # the generality probe
            "nq question: " + en.locality_prompt,          # the locality probe, raw form
            "Which year did the IAAF Combined Events Challenge start?"]},  # duplicate
        {"group_id": "mzsre:0", "language": "de", "paraphrases": [
            en.portability_prompt,                         # another language's probe
            "Seit wann gibt es die IAAF Combined Events Challenge?"]},
        {"group_id": "mzsre:1", "language": "nl", "paraphrases": ["Tot welke familie?"]},
        {"group_id": "mzsre:99", "language": "en", "paraphrases": ["unused"]},
    ]
    path = tmp_path / "paraphrases.jsonl"
    path.write_text("\n".join(json.dumps(l) for l in lines), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lafn_lightning.data"):
        out = attach_paraphrases(groups, path)
    assert out[0].edits["en"].paraphrases == (
        "Which year did the IAAF Combined Events Challenge start?",)
    assert out[0].edits["de"].paraphrases == (
        "Seit wann gibt es die IAAF Combined Events Challenge?",)
    assert out[0].edits["zh"].paraphrases == ()
    assert out[1] == groups[1] and out[2] == groups[2]  # du not loaded; untouched
    assert de.paraphrases == ()  # inputs are not mutated
    assert "dropped 3 equal to an evaluation probe" in caplog.text
    assert "unknown group ids (e.g. mzsre:99)" in caplog.text
    assert "mzsre:1/du" in caplog.text


# ----------------------------------------------------------------------- bad inputs

def test_missing_directory_and_file(tmp_path, dev_copy):
    with pytest.raises(DataError, match="nowhere: file or directory not found"):
        read_mzsre(tmp_path / "nowhere")
    (dev_copy / PAIR.format("de")).unlink()
    with pytest.raises(DataError, match=_re(PAIR.format("de")) + ": file not found"):
        read_mzsre(dev_copy, languages=["en", "de"])
    with pytest.raises(DataError, match="no mzsre_test_duplicate_en"):
        read_mzsre(tmp_path)
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_bizsre(tmp_path / "missing.json")


def test_malformed_json_names_file_and_position(dev_copy):
    f = dev_copy / PAIR.format("ru")
    f.write_text(f.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    with pytest.raises(DataError, match=_re(f.name) + r": malformed JSON at line \d+, column"):
        read_mzsre(dev_copy, languages=["ru"])


def test_top_level_not_a_list(dev_copy):
    (dev_copy / PAIR.format("es")).write_text('{"en": {}}', encoding="utf-8")
    with pytest.raises(DataError, match="enes.json: expected a JSON list of records, got dict"):
        read_mzsre(dev_copy, languages=["es"])


def test_missing_required_field(dev_copy):
    edit_json(dev_copy / PAIR.format("zh"), lambda d: d[17]["zh"].pop("alt"))
    with raises_naming(PAIR.format("zh"), 17, "zh.alt", match="missing required field"):
        read_mzsre(dev_copy)


def test_empty_answer_message_is_exact(dev_copy):
    edit_json(dev_copy / PAIR.format("zh"), lambda d: d[17]["zh"].update(alt="   "))
    with pytest.raises(DataError) as exc:
        read_mzsre(dev_copy, languages=["zh"])
    assert str(exc.value) == "mzsre_test_duplicate_enzh.json: record 17, field 'zh.alt': " \
                             "empty answer"
    assert (exc.value.file, exc.value.index, exc.value.field) == \
        ("mzsre_test_duplicate_enzh.json", 17, "zh.alt")


def test_empty_subject_and_prompt(dev_copy):
    edit_json(dev_copy / PAIR.format("th"), lambda d: d[3]["th"].update(subject=""))
    with raises_naming(PAIR.format("th"), 3, "th.subject", match="empty subject"):
        read_mzsre(dev_copy, languages=["th"])
    edit_json(dev_copy / PAIR.format("tr"), lambda d: d[8]["tr"].update(src="\n"))
    with raises_naming(PAIR.format("tr"), 8, "tr.src", match="empty prompt"):
        read_mzsre(dev_copy, languages=["tr"])


def test_probe_of_wrong_type(dev_copy):
    edit_json(dev_copy / PAIR.format("de"), lambda d: d[40]["de"].update(rephrase=5))
    with raises_naming(PAIR.format("de"), 40, "de.rephrase", match="expected a string, got int"):
        read_mzsre(dev_copy, languages=["de"])


def test_portability_must_be_a_question_answer_object(dev_copy):
    edit_json(dev_copy / PAIR.format("fr"), lambda d: d[2]["fr"].update(portability="x"))
    with raises_naming(PAIR.format("fr"), 2, "fr.portability", match="New Question"):
        read_mzsre(dev_copy, languages=["fr"])
    edit_json(dev_copy / PAIR.format("fr"),
              lambda d: d[2]["fr"].update(portability={"New Question": "Q?"}))
    with raises_naming(PAIR.format("fr"), 2, "fr.portability.New Answer",
                       match="missing while 'fr.portability.New Question' is present"):
        read_mzsre(dev_copy, languages=["fr"])


def test_locality_question_without_answer(dev_copy):
    edit_json(dev_copy / PAIR.format("pt"), lambda d: d[11]["pt"].pop("loc_ans"))
    with raises_naming(PAIR.format("pt"), 11, "pt.loc_ans", match="missing while 'pt.loc'"):
        read_mzsre(dev_copy, languages=["pt"])


def test_optional_probes_may_be_absent(dev_copy):
    def drop(d):
        for key in ("rephrase", "loc", "loc_ans", "portability"):
            d[6]["vi"].pop(key)
    edit_json(dev_copy / PAIR.format("vi"), drop)
    e = read_mzsre(dev_copy, languages=["vi"], select=[6])[0].edits["vi"]
    assert e.rephrase is e.locality_prompt is e.portability_prompt is None
    assert e.probes == ()


def test_missing_language_block(dev_copy):
    edit_json(dev_copy / PAIR.format("du"), lambda d: d[30].pop("du"))
    with raises_naming(PAIR.format("du"), 30, "du", match="missing language block"):
        read_mzsre(dev_copy, languages=["nl"])


def test_english_blocks_must_agree_across_files(dev_copy):
    edit_json(dev_copy / PAIR.format("cz"), lambda d: d[12]["en"].update(src="Changed?"))
    with raises_naming(PAIR.format("cz"), 12, "en.src",
                       match="English block differs from mzsre_test_duplicate_enzh.json"):
        read_mzsre(dev_copy, languages=["zh", "cz"])


def test_record_count_mismatch_between_pair_files(dev_copy):
    edit_json(dev_copy / PAIR.format("vi"), lambda d: d.pop())
    with raises_naming(PAIR.format("vi"), 149, "(record count)",
                       match="file has 149 records but mzsre_test_duplicate_encz.json has 150"):
        read_mzsre(dev_copy)


def test_select_out_of_range_and_malformed():
    with raises_naming(PAIR.format("cz"), 150, "select", match="index out of range"):
        read_mzsre(DEV, select=[3, 150])
    with raises_naming(PAIR.format("zh"), 4, "select", match="selected twice"):
        read_mzsre(DEV, languages=["zh"], select=[4, 4])
    with raises_naming(PAIR.format("zh"), -1, "select", match="index out of range"):
        read_mzsre(DEV, languages=["zh"], select=[-1])
    with pytest.raises(DataError, match="enzh.json: field 'select': invalid selection 'a:b'"):
        read_mzsre(DEV, languages=["zh"], select="a:b")


def test_unknown_language_code_is_rejected():
    with pytest.raises(DataError, match="languages: unknown language code 'xx'; known codes: en,"):
        read_mzsre(DEV, languages=["en", "xx"])


def test_jsonl_bad_inputs(tmp_path):
    good = {"subject": "S", "prompt": "P?", "target": "T"}
    cases = [
        ('{"edits": {"en": ' + json.dumps(good) + "}}\n{oops", 1, "(line)", "malformed JSON on line 2"),
        (json.dumps({"edits": {"en": {**good, "prompt": " "}}}), 0, "edits.en.prompt",
         "empty prompt"),
        (json.dumps({"edits": {"en": {"subject": "S", "target": "T"}}}), 0, "edits.en.prompt",
         "missing required field"),
        (json.dumps({"edits": {"en": {**good, "locality_promt": "x"}}}), 0,
         "edits.en.locality_promt", "unknown field"),
        (json.dumps({"edits": {"en": {**good, "paraphrases": ["ok", ""]}}}), 0,
         "edits.en.paraphrases[1]", "empty paraphrase"),
        (json.dumps({"id": "a", "edits": {"en": good}}) + "\n" +
         json.dumps({"id": "a", "edits": {"en": good}}), 1, "id", "duplicate id 'a'"),
        (json.dumps({"edits": {"cs": good, "cz": good}}), 0, "edits.cz", "given twice"),
        (json.dumps({"edits": {}}), 0, "edits", "non-empty object"),
    ]
    for i, (text, index, field, problem) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text, encoding="utf-8")
        with raises_naming(path.name, index, field, match=_re(problem)):
            read_jsonl(path)
    path = tmp_path / "lang.jsonl"
    path.write_text(json.dumps({"edits": {"en": good, "jp": good}}), encoding="utf-8")
    with pytest.raises(DataError, match=_re("lang.jsonl: record 0, field 'edits.jp': unknown "
                                            "language code 'jp'")):
        read_jsonl(path)


def test_bizsre_bad_record(tmp_path):
    path = tmp_path / "bizsre_test.json"
    data = json.loads(BIZSRE.read_text(encoding="utf-8"))
    data[1]["zh"]["alt"] = ["2006年"]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with raises_naming("bizsre_test.json", 1, "zh.alt", match="expected a string, got list"):
        read_bizsre(path)
    assert read_bizsre(path, languages=["en"])[1].edits["en"].target  # zh not requested


def test_attach_paraphrases_bad_line(tmp_path, dev_groups):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"group_id": "mzsre:0", "language": "en", "paraphrases": ["a"]})
                    + "\n" + json.dumps({"group_id": "mzsre:0", "language": "en",
                                         "paraphrases": "not a list"}), encoding="utf-8")
    with raises_naming("p.jsonl", 1, "paraphrases", match="expected a list of strings"):
        attach_paraphrases(dev_groups, path)
    path.write_text(json.dumps({"group_id": "mzsre:0", "language": "klingon",
                                "paraphrases": []}), encoding="utf-8")
    with pytest.raises(DataError, match="p.jsonl: record 0, field 'language': unknown language"):
        attach_paraphrases(dev_groups, path)
