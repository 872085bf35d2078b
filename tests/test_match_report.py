"""``lafn match-report``: subject-matching coverage per matcher and language, on hand-made data."""
import importlib.util
import json
from pathlib import Path

import pytest

from lafn_lightning.data import load_groups
from lafn_lightning.cli import main
from lafn_lightning.evaluation.match_report import coverage_report, measure

REPO = Path(__file__).resolve().parents[1]

# Two groups in three languages. Which question each matcher finds is known by construction:
#   en  paris.rephrase is lower-case ("paris")            -> exact misses, normalized/fuzzy find
#   ru  paris.rephrase has the inflected "Париже"         -> only fuzzy finds
#   ru  tolstoy.rephrase has "Льва Толстого" (stem change) -> every matcher misses
#   zh  tolstoy.rephrase drops the middle dot of 列夫·托尔斯泰  -> exact misses
#   en  tolstoy.locality mentions "Paris" (Hilton)        -> a false match for every matcher
# Missing probes (ru paris portability, zh tolstoy portability) are left out of the shares.
RECORDS = [
    {"id": "paris", "edits": {
        "en": {"subject": "Paris", "prompt": "Which country is Paris the capital of?", "target": "Italy",
               "rephrase": "paris is the capital of which country?",
               "locality_prompt": "Who painted the Mona Lisa?", "locality_answer": "Leonardo",
               "portability_prompt": "What language is spoken in Paris?", "portability_answer": "Italian"},
        "ru": {"subject": "Париж", "prompt": "Столицей какой страны является Париж?", "target": "Италии",
               "rephrase": "Что известно о Париже?",
               "locality_prompt": "Кто написал «Войну и мир»?", "locality_answer": "Толстой"},
        "zh": {"subject": "巴黎", "prompt": "巴黎是哪个国家的首都？", "target": "意大利",
               "rephrase": "巴黎位于哪个国家？",
               "locality_prompt": "谁发明了电话？", "locality_answer": "贝尔",
               "portability_prompt": "巴黎人说什么语言？", "portability_answer": "意大利语"},
    }},
    {"id": "tolstoy", "edits": {
        "en": {"subject": "Leo Tolstoy", "prompt": "Which language did Leo Tolstoy write in?", "target": "French",
               "rephrase": "In what language did Leo Tolstoy write?",
               "locality_prompt": "Is Paris Hilton famous?", "locality_answer": "yes",
               "portability_prompt": "Where was Leo Tolstoy born?", "portability_answer": "Lyon"},
        "ru": {"subject": "Лев Толстой", "prompt": "На каком языке писал Лев Толстой?", "target": "французском",
               "rephrase": "Что написал Льва Толстого?",
               "locality_prompt": "Какая самая длинная река в мире?", "locality_answer": "Нил",
               "portability_prompt": "Где родился Лев Толстой?", "portability_answer": "Лион"},
        "zh": {"subject": "列夫·托尔斯泰", "prompt": "列夫·托尔斯泰用什么语言写作？", "target": "法语",
               "rephrase": "列夫托尔斯泰用哪种语言写作？",
               "locality_prompt": "世界上最高的山是什么？", "locality_answer": "珠穆朗玛峰"},
    }},
]

EXPECTED = {
    "exact": {"en": {"found": 5 / 6, "false_match": 0.5}, "ru": {"found": 3 / 5, "false_match": 0.0},
              "zh": {"found": 4 / 5, "false_match": 0.0}},
    "normalized": {"en": {"found": 1.0, "false_match": 0.5}, "ru": {"found": 3 / 5, "false_match": 0.0},
                   "zh": {"found": 1.0, "false_match": 0.0}},
    "fuzzy": {"en": {"found": 1.0, "false_match": 0.5}, "ru": {"found": 4 / 5, "false_match": 0.0},
              "zh": {"found": 1.0, "false_match": 0.0}},
}


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def assert_schema(report: dict, matchers, languages) -> None:
    assert list(report) == list(matchers)
    for per_lang in report.values():
        assert list(per_lang) == list(languages)
        for cell in per_lang.values():
            assert set(cell) == {"found", "false_match"}
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in cell.values())


def test_values_on_hand_made_data(dataset):
    groups = load_groups(dataset)
    report, counts = coverage_report(groups)
    assert_schema(report, ("exact", "normalized", "fuzzy"), ("en", "ru", "zh"))
    for mode, per_lang in EXPECTED.items():
        for lang, cell in per_lang.items():
            assert report[mode][lang] == pytest.approx(cell, abs=1e-6), (mode, lang)
    # the raw counts behind the shares: probes a record lacks are not counted
    ru = counts["exact"]["ru"]
    assert (ru.n, ru.found, ru.loc_n) == ({"prompt": 2, "rephrase": 2, "portability": 1},
                                         {"prompt": 2, "rephrase": 0, "portability": 1}, 2)
    assert sorted(m[:2] for m in ru.misses) == [("paris", "rephrase"), ("tolstoy", "rephrase")]
    hits, text = counts["fuzzy"]["en"].loc_hits[0]
    assert text == "Is Paris Hilton famous?" and [m.group_id for m in hits] == ["paris"]


def test_command_reads_the_config_and_writes_json(dataset, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  backbone: tiny-llama\ndata:\n  dataset: {dataset}\n  format: jsonl\n"
                      f"  languages: [en, ru]\n  groups: '0:1'\n", encoding="utf-8")
    out = tmp_path / "reports" / "coverage.json"
    main(["match-report", "-c", str(config), "--data.groups", "null", "--matchers", "[exact,fuzzy]", "--output", str(out)])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert_schema(report, ("exact", "fuzzy"), ("en", "ru"))  # the config's languages
    # every record is registered (--data.groups null):
    # the en locality question of "tolstoy" falsely matches "paris"
    for mode in ("exact", "fuzzy"):
        for lang in ("en", "ru"):
            assert report[mode][lang] == pytest.approx(EXPECTED[mode][lang], abs=1e-6), (mode, lang)
    table = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert "exact" in table and "fuzzy" in table
    assert lines["en"][1:] == ["83.3", "50.0", "100.0", "50.0"]
    assert lines["ru"][1:] == ["60.0", "0.0", "80.0", "0.0"]
    assert lines["all"][1:] == ["72.7", "25.0", "90.9", "25.0"]  # pooled: 8/11 and 10/11, 1/4


def test_options_override_the_config(dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  dataset: /nonexistent/data.jsonl\n  languages: [en]\n", encoding="utf-8")
    out = tmp_path / "coverage.json"
    main(["match-report", "-c", str(config), "--data.dataset", str(dataset), "--data.format", "jsonl",
          "--data.languages", "[zh]", "--data.groups", "1:2", "--matchers", "[exact]", "--output", str(out)])
    # only "tolstoy" is registered, only Chinese is read: its rephrase lacks the middle dot
    assert json.loads(out.read_text()) == {"exact": {"zh": {"found": 0.5, "false_match": 0.0}}}
    main(["match-report", "--data.dataset", str(dataset), "--data.groups", "[0]", "--data.languages", "[en,ru]",
          "--matchers", "[normalized]", "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["normalized"]["en"] == {"found": 1.0, "false_match": 0.0}  # Paris Hilton: group 1 not cached
    assert report["normalized"]["ru"] == {"found": 0.5, "false_match": 0.0}


def test_bad_arguments_give_one_line_and_exit_2(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["match-report", "--data.dataset", str(dataset), "--matchers", "[exact,regex]"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lafn: error: ")]   # Lightning may log "Seed set" first
    assert len(errors) == 1 and "regex" in errors[0] and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["match-report", "-c", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2 and "missing.yaml" in capsys.readouterr().err


def test_language_without_locality_questions_is_null(tmp_path):
    path = tmp_path / "no_loc.jsonl"
    path.write_text(json.dumps({"edits": {"en": {"subject": "Paris", "prompt": "Where is Paris?", "target": "x"}}})
                    + "\n", encoding="utf-8")
    report, _ = coverage_report(load_groups(path), ["exact"])
    assert report == {"exact": {"en": {"found": 1.0, "false_match": None}}}


def test_benchmark_script_uses_the_shared_counting(dataset, capsys):
    spec = importlib.util.spec_from_file_location("match_coverage_dev", REPO / "benchmarks" / "match_coverage_dev.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.measure is measure
    bench.coverage(load_groups(dataset), "fuzzy", misses="ru")
    out = capsys.readouterr().out
    assert "miss ru tolstoy" in out and "Льва Толстого" in out
    assert "loc false 16.67% (1/6)" in out
