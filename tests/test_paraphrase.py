"""lafn paraphrase: parsing and filtering replies, the leak guard, resume, and a real local model."""
import json

import pytest

from conftest import CONFIGS
from lafn_lightning.data import attach_paraphrases, load_groups, read_jsonl
from lafn_lightning.editing.paraphrase import (
    DEFAULT_INSTRUCTION,
    build_instruction,
    parse_paraphrases,
    select_paraphrases,
)
from lafn_lightning.api import Settings, paraphrase
from lafn_lightning.cli import main

GROUP = {"id": "tower", "edits": {
    "en": {"subject": "Gustave Tower", "prompt": "Which city has the Gustave Tower?", "target": "Rome",
           "rephrase": "The Gustave Tower stands in which city?",
           "locality_prompt": "Who painted the Mona Lisa?", "locality_answer": "Leonardo",
           "portability_prompt": "In which country is the Gustave Tower?", "portability_answer": "Italy"},
    "de": {"subject": "Gustave-Turm", "prompt": "Welche Stadt hat den Gustave-Turm?", "target": "Rom",
           "rephrase": "In welcher Stadt steht der Gustave-Turm?"}}}


@pytest.fixture
def data(tmp_path):
    other = {"id": "base", "edits": {
        "en": {"subject": "Apollo Base", "prompt": "Who built the Apollo Base?", "target": "Ada"},
        "de": {"subject": "Apollo-Basis", "prompt": "Wer baute die Apollo-Basis?", "target": "Ada"}}}
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(GROUP) + "\n" + json.dumps(other) + "\n", encoding="utf-8")
    return path


def test_instruction_names_count_language_subject_and_question():
    text = build_instruction(DEFAULT_INSTRUCTION, "Welche Stadt hat den Gustave-Turm?", "Gustave-Turm", "de", 30)
    assert "30" in text and "German" in text and '"Gustave-Turm"' in text and "Welche Stadt hat den Gustave-Turm?" in text


def test_parse_strips_numbering_bullets_and_quotes():
    reply = ('Here you go:\n1. Where is the Gustave Tower?\n 2) "What city is home to the Gustave Tower?"\n\n'
             "- Gustave Tower: which city?\n3、Gustave Tower 在哪个城市？\n10 Which town has the Gustave Tower?")
    assert parse_paraphrases(reply) == [
        "Here you go:", "Where is the Gustave Tower?", "What city is home to the Gustave Tower?",
        "Gustave Tower: which city?", "Gustave Tower 在哪个城市？", "Which town has the Gustave Tower?"]


def test_select_drops_probes_of_any_language_missing_subject_duplicates_and_the_question(tmp_path, data):
    group = read_jsonl(data)[0]
    candidates = [
        "Here you go:",                                   # no subject
        "Which city has the Gustave Tower?",              # the edit question itself
        "the gustave tower  stands in which city?",       # the English rephrase probe (case/space aside)
        "In which country is the Gustave Tower?",         # the portability probe
        "Where is the Gustave Tower?",
        "Where is the Gustave Tower?",                    # duplicate
        "In welcher Stadt steht der Gustave-Turm?",       # the German rephrase probe (any language of the group)
        "What city hosts the Gustave Tower?",
        "Gustave Tower: which city?",
    ]
    kept, dropped = select_paraphrases(candidates, group, "en", n=30)
    assert kept == ["Where is the Gustave Tower?", "What city hosts the Gustave Tower?", "Gustave Tower: which city?"]
    assert dropped == {"probe": 3, "no_subject": 1, "duplicate": 2}
    capped, _ = select_paraphrases(candidates, group, "en", n=2, already=["Where is the Gustave Tower?"])
    assert capped == ["What city hosts the Gustave Tower?"]
    anything, _ = select_paraphrases(["Here you go:"], group, "en", n=30, keep_any=True)
    assert anything == ["Here you go:"]


def fake_model(calls):
    """A stand-in for the instruct model: replies with a numbered list built from the instruction,
    including a copy of the group's rephrase probe (which must never reach the corpus)."""
    def generate(instructions, *, sample, seed):
        calls.extend(instructions)
        out = []
        for ins in instructions:
            question = ins.rsplit("Question: ", 1)[1]
            subject = ins.split('subject "', 1)[1].split('"', 1)[0]
            out.append("\n".join([f"1. {question}", "2. The Gustave Tower stands in which city?",
                                  f"3. Tell me: {question}", f"4. {subject}?", "5. unrelated"]))
        return out
    return generate


def test_command_writes_the_corpus_attach_reads_it_and_resumes(tmp_path, data):
    out = tmp_path / "para.jsonl"
    settings = Settings.from_config(overrides={"data.dataset": str(data), "data.format": "jsonl",
                                               "data.languages": ["en", "de"], "data.groups": None})

    def run(generate):
        paraphrase(settings, instruct_model=str(tmp_path / "unused"), output=str(out), num=5, rounds=2, generate=generate)

    calls = []
    run(fake_model(calls))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["group_id"], x["language"]) for x in lines] == [("tower", "en"), ("tower", "de"), ("base", "en"),
                                                                ("base", "de")]
    assert lines[0]["paraphrases"] == ["Tell me: Which city has the Gustave Tower?", "Gustave Tower?"]
    assert all(set(x) == {"group_id", "language", "paraphrases"} for x in lines)
    # the model never saw a probe; the probe it produced was dropped
    assert not any(p in ins for ins in calls for p in ("stands in which city", "Mona Lisa", "In which country"))
    assert all("stands in which city" not in p for x in lines for p in x["paraphrases"])
    assert len(calls) == 8                                   # 2 rounds: fewer than --num survived round 1
    groups = attach_paraphrases(load_groups(data, format="jsonl"), out)
    assert groups[0].edits["en"].paraphrases == ("Tell me: Which city has the Gustave Tower?", "Gustave Tower?")
    assert groups[1].edits["de"].paraphrases == ("Tell me: Wer baute die Apollo-Basis?", "Apollo-Basis?")

    # resume: nothing to do, nothing generated
    calls.clear()
    run(fake_model(calls))
    assert calls == [] and len(out.read_text().splitlines()) == 4
    # a crash mid-line and a missing line: only the missing question is generated again
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + "\n" + '{"group_id": "base", "lang', encoding="utf-8")
    run(fake_model(calls))
    assert len(calls) == 4 and all("Apollo" in c for c in calls)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again == lines


def test_command_with_a_real_local_model(tmp_path, data):
    """A tiny random chat model from a local folder: its replies are noise, so this checks plumbing only
    (local loading, chat template, batching, resume and the file format)."""
    from lafn_lightning.backbone.tiny import tiny_model, tiny_tokenizer

    folder = tmp_path / "instruct"
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "para.jsonl"
    argv = ["paraphrase", "--instruct_model", str(folder), "--output", str(out), "--data.dataset", str(data),
            "--data.format", "jsonl", "--data.languages", "null", "--num", "3", "--rounds", "2", "--max_new_tokens", "12",
            "--batch_size", "3", "--keep_any", "true"]
    main(argv)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["group_id"], x["language"]) for x in lines] == [("tower", "en"), ("tower", "de"), ("base", "en"),
                                                                ("base", "de")]
    assert all(isinstance(p, str) and p == p.strip() and p for x in lines for p in x["paraphrases"])
    assert all(len(x["paraphrases"]) <= 3 for x in lines)
    attach_paraphrases(load_groups(data, format="jsonl"), out)          # the readers accept the file
    before = out.read_bytes()
    main(argv)
    assert out.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        paraphrase(Settings.from_config(CONFIGS / "tiny.yaml", overrides={"data.groups": "0:1"}),
                   instruct_model=str(tmp_path / "nowhere"), output=str(tmp_path / "x.jsonl"))


@pytest.fixture
def chat_server(tmp_path):
    """tests/fixtures/chat_server.py as a real process listening on loopback; yields (url, log path)."""
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "requests.jsonl"
    script = Path(__file__).parent / "fixtures" / "chat_server.py"
    proc = subprocess.Popen([sys.executable, str(script), str(log)], stdout=subprocess.PIPE, text=True,
                            env={"CHAT_SERVER_KEY": "secret", "PATH": ""})
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORT "), line
        yield f"http://127.0.0.1:{line.split()[1]}/v1", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_openai_compatible_endpoint_over_loopback(tmp_path, data, chat_server, monkeypatch):
    """The paper generated paraphrases through an API: a real HTTP server process on 127.0.0.1."""
    url, log = chat_server
    out = tmp_path / "para.jsonl"
    monkeypatch.setenv("LAFN_TEST_KEY", "secret")
    main(["paraphrase", "-c", str(CONFIGS / "tiny.yaml"), "--data.dataset", str(data), "--data.format", "jsonl",
          "--data.languages", "[en, de]", "--data.groups", "null", "--instruct_model", "para-model",
          "--endpoint", url, "--api_key_env", "LAFN_TEST_KEY", "--output", str(out), "--num", "2", "--rounds", "1"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["group_id"], x["language"]) for x in lines] == [("tower", "en"), ("tower", "de"), ("base", "en"),
                                                                ("base", "de")]
    assert lines[0]["paraphrases"] == ["Tell me: Which city has the Gustave Tower?", "Gustave Tower?"]
    assert lines[3]["paraphrases"] == ["Tell me: Wer baute die Apollo-Basis?", "Apollo-Basis?"]
    sent = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(sent) == 4 and all(b["model"] == "para-model" and b["temperature"] == 0.0 for b in sent)
    assert "Welche Stadt hat den Gustave-Turm?" in sent[1]["messages"][0]["content"]


def test_endpoint_errors_name_the_url_before_any_question(tmp_path, data, chat_server, monkeypatch, capsys):
    url, log = chat_server
    base = ["paraphrase", "-c", str(CONFIGS / "tiny.yaml"), "--data.dataset", str(data), "--data.format", "jsonl",
            "--data.languages", "[en, de]", "--data.groups", "null", "--output", str(tmp_path / "p.jsonl")]
    monkeypatch.setenv("LAFN_TEST_KEY", "secret")
    cases = [(["--instruct_model", "other-model", "--endpoint", url, "--api_key_env", "LAFN_TEST_KEY"],
              "does not serve model 'other-model'; it serves para-model"),
             (["--instruct_model", "para-model", "--endpoint", url, "--api_key_env", "NO_SUCH_KEY"], "HTTP 401"),
             (["--instruct_model", "para-model", "--endpoint", "http://127.0.0.1:9/v1"], "cannot reach the endpoint")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, err
    assert not log.exists() and not (tmp_path / "p.jsonl").exists()
