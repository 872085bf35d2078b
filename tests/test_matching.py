"""Subject matching: exact / normalized / fuzzy, offsets, overlaps, near misses, updates."""

from __future__ import annotations

import pytest

from lafn_lightning.text.matching import MATCHERS, Match, SubjectMatcher


def spans(matcher: SubjectMatcher, text: str) -> list[tuple[str, str]]:
    """(group id, matched original text) per match."""
    return [(m.group_id, text[m.start : m.end]) for m in matcher.find(text)]


def test_unknown_mode_lists_the_matchers():
    with pytest.raises(ValueError) as err:
        SubjectMatcher({}, mode="regex")
    for mode in MATCHERS:
        assert mode in str(err.value)


# ----------------------------------------------------------------------------------- exact


def test_exact_is_case_sensitive_and_respects_word_boundaries():
    m = SubjectMatcher({"paris": ["Paris"]}, mode="exact")
    assert spans(m, "Is Paris big?") == [("paris", "Paris")]
    assert spans(m, "A Parisian café") == []
    assert spans(m, "The city of SuperParis") == []
    assert spans(m, "paris is lowercase") == []
    assert spans(m, "«Paris»-based, Paris.") == [("paris", "Paris"), ("paris", "Paris")]


def test_exact_in_scripts_without_spaces_and_mixed_scripts():
    m = SubjectMatcher(
        {"tokyo": ["Tokyo", "东京"], "poppy": ["Poppy Flowers", "ดอกฝิ่น"]}, mode="exact"
    )
    assert spans(m, "我住在东京都。") == [("tokyo", "东京")]
    assert spans(m, "คุณพบดอกฝิ่นได้ที่ไหน") == [("poppy", "ดอกฝิ่น")]
    # the English form inside Thai / Chinese text, with no spaces around it
    assert spans(m, "สถานที่ที่พบPoppy Flowersคือ") == [("poppy", "Poppy Flowers")]
    assert spans(m, "Tokyo的人口") == [("tokyo", "Tokyo")]


@pytest.mark.parametrize("mode", MATCHERS)
def test_thai_inside_english_and_chinese_without_spaces(mode):
    m = SubjectMatcher(
        {"poppy": ["Poppy Flowers", "ดอกฝิ่น"], "aeneas": ["Aeneas", "埃涅阿斯"]}, mode=mode
    )
    assert spans(m, "Where do ดอกฝิ่น grow?") == [("poppy", "ดอกฝิ่น")]
    assert spans(m, "Where doดอกฝิ่นgrow?") == [("poppy", "ดอกฝิ่น")]
    assert spans(m, "哪位女士生下了埃涅阿斯？") == [("aeneas", "埃涅阿斯")]
    assert spans(m, "哪位女士生下了Aeneas？") == [("aeneas", "Aeneas")]


def test_exact_does_not_end_inside_a_character():
    m = SubjectMatcher({"g": ["Cafe"]}, mode="exact")
    assert spans(m, "Cafe\u0301 noir") == []  # "Café" with a combining accent
    assert spans(m, "Cafe noir") == [("g", "Cafe")]


def test_exact_boundary_only_on_the_word_side():
    m = SubjectMatcher({"sub": ["U-270"], "cpp": ["C++"]}, mode="exact")
    assert spans(m, "the U-270's crew (U-270)") == [("sub", "U-270"), ("sub", "U-270")]
    assert spans(m, "the U-2701") == []
    assert spans(m, "C++11 and C++") == [("cpp", "C++"), ("cpp", "C++")]


# ----------------------------------------------------------------------------------- normalized


def test_normalized_case_punctuation_quotes_and_hyphens():
    m = SubjectMatcher(
        {
            "sartre": ["Jean-Paul Sartre"],
            "iaaf": ["IAAF Combined Events Challenge"],
            "smith": ["Mr. Smith Carries On"],
            "hd": ["HD 180902"],
        },
        mode="normalized",
    )
    assert spans(m, "Who was JEAN PAUL sartre?") == [("sartre", "JEAN PAUL sartre")]
    assert spans(m, "Quand le iaaf combined-events challenge") == [
        ("iaaf", "iaaf combined-events challenge")
    ]
    assert spans(m, "the film Mr Smith Carries On.") == [("smith", "Mr Smith Carries On")]
    assert spans(m, "Where is HD180902?") == [("hd", "HD180902")]
    # a curly apostrophe before the subject (French elision)
    m2 = SubjectMatcher({"iaaf": ["IAAF"]}, mode="normalized")
    assert spans(m2, "la création du Défi de l’IAAF ?") == [("iaaf", "IAAF")]
    assert spans(m2, "the IAAFs") == []  # whole words only


def test_normalized_offsets_map_back_through_length_changes():
    m = SubjectMatcher(
        {"fire": ["fire station"], "paris": ["Paris"], "cafe": ["Café Flore"], "ga": ["ガス"]},
        mode="normalized",
    )
    text = "The ﬁre station is near Ｐａｒｉｓ, by Cafe\u0301 Flore; ｶﾞｽ."
    found = m.find(text)
    assert [(x.group_id, text[x.start : x.end]) for x in found] == [
        ("fire", "ﬁre station"),  # one ligature char stands for "fi"
        ("paris", "Ｐａｒｉｓ"),  # full-width letters
        ("cafe", "Cafe\u0301 Flore"),  # decomposed accent: the span keeps the mark
        ("ga", "ｶﾞｽ"),  # half-width katakana with a separate voicing mark
    ]
    assert all(isinstance(x, Match) for x in found)
    assert found[0].subject == "fire station" and found[1].subject == "Paris"


def test_normalized_ignores_format_characters_and_spaces_between_thai_characters():
    m = SubjectMatcher({"paris": ["Paris"], "th": ["ชมาวอน ชมโวยัน"]}, mode="normalized")
    assert spans(m, "Pa\u00adris is big") == [("paris", "Pa\u00adris")]  # soft hyphen
    assert spans(m, "ชมาวอนชมโวยันมาจากไหน") == [("th", "ชมาวอนชมโวยัน")]


def test_normalized_turkish_dotted_capital_i():
    m = SubjectMatcher({"tr": ["istanbul"]}, mode="normalized")
    assert spans(m, "İstanbul'un nüfusu") == [("tr", "İstanbul")]


def test_symbols_are_part_of_the_subject():
    m = SubjectMatcher({"shake": ["Shake!"], "csharp": ["C#"]}, mode="normalized")
    assert spans(m, "On which channel did Shake! first air?") == [("shake", "Shake!")]
    assert spans(m, "Shake the bottle") == []
    assert spans(m, "Is C# like C?") == [("csharp", "C#")]


# ----------------------------------------------------------------------------------- fuzzy


def test_fuzzy_russian_case_endings_span_the_whole_inflected_word():
    m = SubjectMatcher({"msk": ["Moscow", "Москва"]}, mode="fuzzy")
    for text, word in [
        ("Я живу в Москве.", "Москве"),
        ("Население Москвы растёт", "Москвы"),
        ("Он гордится Москвой", "Москвой"),
        ("Москва — столица", "Москва"),
    ]:
        assert spans(m, text) == [("msk", word)]


def test_fuzzy_multiword_russian_and_czech_declension():
    m = SubjectMatcher(
        {
            "sub": ["Немецкая подводная лодка U-270", "Německá ponorka U-270"],
            "maria": ["Maria Antonia Ferdinanda"],
            "dughlat": ["Mirza Muhammad Haidar Dughlat"],
        },
        mode="fuzzy",
    )
    assert spans(m, "Кто построил немецкую подводную лодку U-270?") == [
        ("sub", "немецкую подводную лодку U-270")
    ]
    assert spans(m, "Která společnost vyrobila německou ponorku U-270?") == [
        ("sub", "německou ponorku U-270")
    ]
    assert spans(m, "Kdo je matka Marie Antonie Ferdinandy?") == [
        ("maria", "Marie Antonie Ferdinandy")
    ]
    assert spans(m, "Datum narození Mirzy Muhammada Haidara Dughlata?") == [
        ("dughlat", "Mirzy Muhammada Haidara Dughlata")
    ]


def test_fuzzy_czech_praha_and_feminine_surnames():
    m = SubjectMatcher({"prg": ["Praha"], "jane": ["Jane Seymour"]}, mode="fuzzy")
    assert spans(m, "Byl v Praze i v Prahy, ne v Praha.") == [
        ("prg", "Praze"),
        ("prg", "Prahy"),
        ("prg", "Praha"),
    ]
    assert spans(m, "Kdo byl otcem Jane Seymourové?") == [("jane", "Jane Seymourové")]


def test_fuzzy_german_genitive_and_adjective_endings():
    m = SubjectMatcher(
        {
            "flight": ["Air-France-Flug 447"],
            "kingdom": ["Wiederhergestelltes Hanthawaddy-Königreich"],
            "boot": ["Deutsches U-Boot U-270"],
        },
        mode="fuzzy",
    )
    assert spans(m, "Wann war der Zeitpunkt des Air-France-Fluges 447?") == [
        ("flight", "Air-France-Fluges 447")
    ]
    assert spans(m, "das letzte Jahr des wiederhergestellten Hanthawaddy-Königreichs?") == [
        ("kingdom", "wiederhergestellten Hanthawaddy-Königreichs")
    ]
    assert spans(m, "Wer baute das deutsche U-Boot U-270?") == [
        ("boot", "deutsche U-Boot U-270")
    ]


def test_fuzzy_diacritics_and_thai_tone_marks():
    m = SubjectMatcher(
        {"nenad": ["Nenad Stamenković"], "gemma": ["เจมมา โบซินี"], "kid": ["คลอโรฟิลล์คิดส์"]},
        mode="fuzzy",
    )
    assert spans(m, "Where was Nenad Stamenkovic born?") == [("nenad", "Nenad Stamenkovic")]
    assert spans(m, "เจมม่า โบซินี เสียงประเภทไหน?") == [("gemma", "เจมม่า โบซินี")]
    assert spans(m, "คลอโรฟิลล์ คิด เป็นส่วนหนึ่ง") == [("kid", "คลอโรฟิลล์ คิด")]


def test_fuzzy_turkish_apostrophe_suffixes_and_possessive_case():
    m = SubjectMatcher(
        {"uss": ["USS Leedstown (APA-56)"], "station": ["Toodyay İtfaiye İstasyonu"]},
        mode="fuzzy",
    )
    assert spans(m, "USS Leedstown'u (APA-56) hangi şirket yarattı?") == [
        ("uss", "USS Leedstown'u (APA-56")
    ]
    assert spans(m, "Toodyay İtfaiye İstasyonunun mimarı kim?") == [
        ("station", "Toodyay İtfaiye İstasyonunun")
    ]


def test_fuzzy_chinese_and_english_inside_thai():
    m = SubjectMatcher({"lancaster": ["兰开斯特的托马斯", "Toodyay Fire Station"]}, mode="fuzzy")
    assert spans(m, "兰开斯特的托马斯在世时") == [("lancaster", "兰开斯特的托马斯")]
    assert spans(m, "สถาปนิกของToodyay Fire Stationคือใคร") == [
        ("lancaster", "Toodyay Fire Station")
    ]


@pytest.mark.parametrize("mode", MATCHERS)
@pytest.mark.parametrize(
    "subject, text",
    [
        ("Iran", "Where is Iraq?"),
        ("Austria", "Is Australia big?"),
        ("Sweden", "Are the Swedes tall?"),
        ("Carlos", "Carla sings"),
        ("Mali", "The capital Malé"),
        ("Lắc!", "nơi Methley tọa lạc là gì?"),
        ("Walter Scott", "Walt Scott wrote"),
        ("Gioachino Rossini", "Gioachino Rossi was"),
        ("Jane Austen", "Jane Austin lived"),
        ("Gemma Bosini", "Gemma Rosini sang"),
        ("Paris", "A Parisian café"),
        ("Эней", "Какая женщина родила Энея?"),  # short one-word stem: not risked
        ("Bosnia", "Bosnian Serbs"),
        ("Slovakia", "Slovenia"),
    ],
)
def test_no_false_match_on_near_misses(mode, subject, text):
    assert SubjectMatcher({"g": [subject]}, mode=mode).find(text) == []


# ----------------------------------------------------------------------------------- overlaps


@pytest.mark.parametrize("mode", MATCHERS)
def test_overlapping_subjects_resolve_to_the_longest(mode):
    m = SubjectMatcher(
        {"ny": ["New York"], "nyt": ["New York Times"], "times": ["Times"]}, mode=mode
    )
    text = "Does the New York Times cover New York?"
    assert spans(m, text) == [("nyt", "New York Times"), ("ny", "New York")]
    every = {(x.group_id, text[x.start : x.end]) for x in m.find_all(text)}
    assert every == {
        ("ny", "New York"),
        ("nyt", "New York Times"),
        ("times", "Times"),
    }


@pytest.mark.parametrize("mode", MATCHERS)
def test_overlap_ties_go_to_earlier_start_then_smaller_group_id(mode):
    m = SubjectMatcher({"b": ["red fox"], "a": ["fox den"], "c": ["red fox"]}, mode=mode)
    # "red fox" and "fox den" are equally long: the earlier one wins; "b" and "c" share a
    # subject: the smaller id wins, whatever the insertion order
    assert [x.group_id for x in m.find("a red fox den")] == ["b"]


@pytest.mark.parametrize("mode", MATCHERS)
def test_matches_are_sorted_and_disjoint(mode):
    m = SubjectMatcher(
        {"1": ["Anna Karenina"], "2": ["Leo Tolstoy"], "3": ["Tolstoy"], "4": ["Karenina"]},
        mode=mode,
    )
    text = "Karenina: Leo Tolstoy wrote Anna Karenina, and Tolstoy again."
    found = m.find(text)
    assert [(x.group_id, text[x.start : x.end]) for x in found] == [
        ("4", "Karenina"),
        ("2", "Leo Tolstoy"),
        ("1", "Anna Karenina"),
        ("3", "Tolstoy"),
    ]
    assert all(a.end <= b.start for a, b in zip(found, found[1:]))


# ----------------------------------------------------------------------------------- updates


@pytest.mark.parametrize("mode", MATCHERS)
def test_add_remove_and_replace(mode):
    m = SubjectMatcher({"g1": ["Paris", "Париж"]}, mode=mode)
    assert len(m) == 1 and "g1" in m
    assert [x.group_id for x in m.find("Paris and Rome")] == ["g1"]
    m.add("g2", ["Rome", "Рим"])
    assert len(m) == 2
    assert [x.group_id for x in m.find("Paris and Rome")] == ["g1", "g2"]
    m.remove("g1")
    assert len(m) == 1 and "g1" not in m
    assert [x.group_id for x in m.find("Paris and Rome")] == ["g2"]
    m.add("g2", ["Milan"])  # re-adding replaces the subjects
    assert m.find("Paris and Rome") == []
    assert [x.group_id for x in m.find("Milan")] == ["g2"]
    with pytest.raises(KeyError):
        m.remove("g1")
    m.remove("g2")
    assert len(m) == 0 and m.find("Milan") == []


@pytest.mark.parametrize("mode", MATCHERS)
def test_shared_subject_survives_removal_of_one_group(mode):
    m = SubjectMatcher({"a": ["Venera 9"], "b": ["Venera 9", "Венера 9"]}, mode=mode)
    assert [x.group_id for x in m.find_all("Venera 9 landed")] == ["a", "b"]
    m.remove("a")
    assert [x.group_id for x in m.find("Venera 9 landed")] == ["b"]
    m.remove("b")
    assert m.find("Venera 9 landed") == []


@pytest.mark.parametrize("mode", MATCHERS)
def test_empty_inputs(mode):
    m = SubjectMatcher({"g": ["", "   ", "Oslo"]}, mode=mode)
    assert m.subjects("g") == ("Oslo",)
    assert m.find("") == []
    assert SubjectMatcher({}, mode=mode).find("Oslo") == []
    m.add("h", "Bergen")  # a bare string is one subject, not its characters
    assert [x.group_id for x in m.find("Bergen")] == ["h"]


def test_no_match_inside_one_expanded_character():
    m = SubjectMatcher({"one": ["1"]}, mode="normalized")
    assert m.find("½ cup") == []  # NFKC: "1⁄2"
    assert spans(m, "① and 1") == [("one", "①"), ("one", "1")]


@pytest.mark.parametrize("mode", MATCHERS)
def test_spans_always_map_back_to_the_subject(mode):
    """Random texts mixing width/ligature/combining/Thai/CJK variants: every reported span,
    cut from the original text, is itself found as that whole subject."""
    import random

    rng = random.Random(0)
    pieces = ["ﬁ", "Ｐａｒｉｓ", "e\u0301", "ｶﾞ", "İ", "ß", "ดอก", "东", " ", "-", "’", ".", "!",
              "abc", "Москве", "\u00ad", "①", "½", "ﬀ", "Ⅻ", "\u0301", "x", "9"]
    subjects = ["Paris", "fin", "Café", "ガ", "istanbul", "strasse", "ดอกฝิ่น", "东京",
                "Москва", "abc x", "1", "U-270", "ff", "xii"]
    m = SubjectMatcher({f"g{i}": [s] for i, s in enumerate(subjects)}, mode=mode)
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces + subjects) for _ in range(rng.randint(0, 10)))
        found = m.find(text)
        assert all(a.end <= b.start for a, b in zip(found, found[1:]))
        for hit in found:
            piece = text[hit.start : hit.end]
            alone = SubjectMatcher({hit.group_id: [hit.subject]}, mode=mode).find(piece)
            assert [(x.start, x.end) for x in alone] == [(0, len(piece))], (text, hit)
            checked += 1
    assert checked > 1000


# ----------------------------------------------------------------------------------- folds and scripts


def test_the_three_folds_differ_where_documented():
    """text/folding.py: the matchers' case fold keeps accents, the fuzzy fold drops them and folds
    ø/ł, the router's n-gram fold drops every mark but Thai ones and keeps ø; one case rule for all."""
    from lafn_lightning.text.folding import fold_accents, fold_case, ngram_fold

    assert fold_case("İSTANBUL") == "istanbul" and fold_case("Café") == "café" and fold_case("ﬁ") == "fi"
    assert fold_accents(fold_case("Łódź")) == "lodz" and fold_accents("ดอกฝิ่น") == "ดอกฝิน"
    assert fold_accents("คิดส์") == ""
    assert ngram_fold("Łódź, Ærø!") == "łodz ærø" and ngram_fold("İstanbul") == "istanbul"
    assert ngram_fold("ดอกฝิ่น") == "ดอกฝิ่น"       # Thai marks are part of the spelling
    assert ngram_fold("ガ") == "カ" and ngram_fold("한") == "\u1112\u1161\u11ab"   # voicing mark; jamo


def test_script_rules_for_spaces_and_ngrams():
    """Korean is written with spaces; Han, Kana, Thai, Lao, Khmer and Myanmar are not. The
    router's bigram rule reads that table on folded text, so folded Korean counts in trigrams."""
    from lafn_lightning.routing.lexical import fold
    from lafn_lightning.text.scripts import is_logographic, is_unspaced, mostly_unspaced

    assert all(is_unspaced(c) for c in "巴カかกລກ្មမ") and not is_unspaced("한")
    assert is_logographic("한") and is_logographic("钫") and not is_logographic("ก")
    assert mostly_unspaced(fold("IAAF综合项目挑战赛")) and mostly_unspaced(fold("กรุงเทพ มหานคร"))
    assert not mostly_unspaced(fold("国际田联 Challenge"))   # at least half of the characters
    assert not mostly_unspaced(fold("서울 특별시")) and not mostly_unspaced(fold("Москва"))
