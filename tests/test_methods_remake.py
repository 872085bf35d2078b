"""ReMaKE on a tiny model: KB on disk with fingerprint, retrieval, threshold, untouched unrelated queries."""
import pytest
import torch

from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.data import EditGroup, LanguageEdit
from lafn_lightning.evaluation.metrics import teacher_forced_predictions
from lafn_lightning.methods.remake import KnowledgeBase, RemakeRetriever

G0 = EditGroup("g0", 0, {"en": LanguageEdit("en", "Eiffel tower", "Where is the Eiffel tower?", "Rome"),
                         "zh": LanguageEdit("zh", "埃菲尔铁塔", "埃菲尔铁塔在哪里？", "罗马")})
G1 = EditGroup("g1", 1, {"en": LanguageEdit("en", "Hamlet", "Who wrote Hamlet?", "Goethe"),
                         "zh": LanguageEdit("zh", "哈姆雷特", "哈姆雷特的作者是谁？", "歌德")})
FACTS = {"en": [(f"What is the capital of country number {i}?", f"City {i}") for i in range(30)],
         "zh": [(f"第{i}号国家的首都是什么？", f"城市{i}") for i in range(30)]}


@pytest.fixture(scope="module")
def kb():
    torch.set_num_threads(1)
    model, tok = load_backbone("tiny-llama")
    return KnowledgeBase.build(model, tok, [G0, G1], ["en", "zh"], distractors=20, calibration=10, facts=FACTS, layer=1)


def test_kb_round_trips_through_safetensors_and_refuses_another_backbone(kb, tmp_path):
    path = kb.save(tmp_path / "kb")
    assert {p.name for p in path.iterdir()} == {"kb.safetensors", "kb.json"}
    model, _ = load_backbone("tiny-llama")
    back = KnowledgeBase.load(path, model)
    assert torch.equal(back.embeddings, kb.embeddings) and back.questions == kb.questions
    assert back.group_ids.count("g0") == 2 and back.group_ids.count("") == 40
    assert back.threshold == kb.threshold and back.layer == 1
    other, _ = load_backbone("tiny-qwen2")
    with pytest.raises(ValueError, match="another backbone"):
        KnowledgeBase.load(path, other)


def test_edit_question_retrieves_its_fact_per_language_and_prepends_it(kb):
    model, tok = load_backbone("tiny-llama")
    remake = RemakeRetriever(model, tok, kb)
    hits = remake.retrieve(["Where is the Eiffel tower?"])[0]
    en = [i for i, s in hits if kb.languages[i] == "en"]
    assert kb.questions[en[0]] == "Where is the Eiffel tower?" and abs(hits[0][1] - 1.0) < 1e-5
    prompt = remake.prompts(["Where is the Eiffel tower?"])[0]
    assert prompt.startswith("Where is the Eiffel tower? Rome\n") and prompt.endswith("\nWhere is the Eiffel tower?")
    # restricted to g1, g0's facts cannot be retrieved any more
    only_g1 = remake.retrieve(["Where is the Eiffel tower?"], groups=["g1"])[0]
    assert all(kb.group_ids[i] != "g0" for i, _ in only_g1)


def test_queries_below_threshold_get_no_context_and_the_backbone_prediction(kb):
    model, tok = load_backbone("tiny-llama")
    strict = RemakeRetriever(model, tok, kb, threshold=1.01)     # nothing is relevant enough
    queries, answers = ["Where is the Eiffel tower?", "Who wrote Hamlet?"], ["Rome", "Goethe"]
    assert strict.prompts(queries) == queries
    assert strict.stats()["with_context"] == 0
    base = teacher_forced_predictions(model, tok, queries, answers)
    assert teacher_forced_predictions(model, tok, strict.prompts(queries), answers) == base
    loose = RemakeRetriever(model, tok, kb, threshold=-1.01)     # everything is: the top-1 of each language
    assert all(p.count("\n") == 2 for p in loose.prompts(queries))


def test_threshold_calibrated_on_held_out_groups_lies_between_unrelated_and_rephrased_queries():
    model, tok = load_backbone("tiny-llama")

    def group(i, q, a, loc):
        return EditGroup(f"c{i}", i, {"en": LanguageEdit("en", "s", q, a, rephrase=q.replace("?", " ?"),
                                                         locality_prompt=loc, locality_answer="x")})

    calib = [group(i, f"Who founded company number {i}?", f"Person {i}", f"nq question: how tall is mountain {i}")
             for i in range(6)]
    kb = KnowledgeBase.build(model, tok, [G0], ["en"], distractors=20, calibration=0, facts=FACTS, layer=1,
                             calibration_groups=calib)
    info = kb.calibration
    assert info["pairs"] == 6 and info["source"] == "held-out edit groups"
    assert info["neg_p95"] <= kb.threshold
    assert kb.threshold == max((info["neg_p95"] + info["pos_p50"]) / 2, info["neg_p95"])
