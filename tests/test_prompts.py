"""Which token an edit attaches to, and which tokens are the answer."""
from lafn_lightning.backbone.loading import tiny_tokenizer
from lafn_lightning.editing.prompts import ANCHOR_TEMPLATES, encode_edit_text, join_prompt_target, subject_span
from lafn_lightning.data import MZSRE_LANGUAGES


def test_join_prompt_target_spacing():
    assert join_prompt_target("Who founded X?", "Bob") == "Who founded X? Bob"
    assert join_prompt_target("X的创始人是谁？", "鲍勃") == "X的创始人是谁？鲍勃"
    assert join_prompt_target("X ก่อตั้งเมื่อใด", "2549") == "X ก่อตั้งเมื่อใด2549"
    assert join_prompt_target("Q: ", "A") == "Q: A"


def test_subject_rules():
    group = ["IAAF Combined Events Challenge", "ความท้าทายของกิจกรรมรวม IAAF", "IAAF"]
    q = "IAAF Combined Events Challenge ริเริ่มขึ้นเมื่อใด"
    assert subject_span(q, group[1], group) == (0, 30, "other")          # longest other subject
    assert subject_span("When did IAAF start?", "IAAF", group)[2] == "own"
    q = "Какого пола Лолы Бет?"
    assert subject_span(q, "Лола Бет", ["Lola Beth", "Лола Бет"]) == (q.index("Лолы"), q.index("Лолы") + 8, "fuzzy")
    s, e, rule = subject_span("Ни одного субъекта тут нет?", "Лола", ["Лола"])
    assert rule == "fallback" and "Ни одного субъекта тут нет?"[s:e] == "т"


def test_encoding_marks_subject_token_and_answer_tokens():
    tok = tiny_tokenizer()
    enc = encode_edit_text(tok, "这 是", "IAAF综合项目挑战赛的创立时间是什么时候？", "2006年", "IAAF综合项目挑战赛", ["IAAF综合项目挑战赛"])
    assert tok.decode(enc.input_ids[: enc.subject_pos + 1], skip_special_tokens=True).endswith("挑战赛")
    assert tok.decode([enc.input_ids[i] for i in enc.target_positions]) == "2006年"
    assert enc.target_positions == list(range(enc.target_positions[0], len(enc.input_ids)))
    anchor = encode_edit_text(tok, "", "Ramalinaceae is a", None, "Ramalinaceae", ["Ramalinaceae"])
    assert anchor.target_positions == [] and tok.decode(anchor.input_ids[1: anchor.subject_pos + 1]) == "Ramalinaceae"


def test_every_mzsre_language_has_an_anchor_template():
    assert set(ANCHOR_TEMPLATES) == set(MZSRE_LANGUAGES)
