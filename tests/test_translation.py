"""minigpt.translation: the Tatoeba loader, the split by sentence, chrF, the baseline."""

from __future__ import annotations

import random

import pytest

from minigpt import data
from minigpt.data import DataFormatError
from minigpt.instruct import InstructionExample, format_prompt
from minigpt.translation import (
    TRANSLATE_BACK_INSTRUCTION,
    TRANSLATE_INSTRUCTION,
    TranslationPair,
    back_translation_example,
    chrf,
    edit_distance,
    exact_match,
    language_prompt,
    load_translation_pairs,
    nearest_neighbour_translations,
    nearest_sources,
    normalize_spaces,
    references,
    sentence_chrf,
    split_by_source,
    translation_example,
)

CREDIT = "CC-BY 2.0 (France) Attribution: tatoeba.org #1 (a) & #2 (b)"


@pytest.fixture(scope="module")
def pairs() -> list[TranslationPair]:
    try:
        data.path("tatoeba-eng-fra", download=False)
    except data.DataError:
        pytest.skip("the Tatoeba file is not in MINIGPT_DATA_DIR or the cache")
    return load_translation_pairs()


@pytest.fixture(scope="module")
def baseline(pairs):
    """(hypotheses, references) of the nearest-neighbour baseline on the seed-0 test split."""
    train, test = split_by_source(pairs, test_fraction=0.2, seed=0)
    refs = references(test)
    return nearest_neighbour_translations(train, list(refs)), list(refs.values())


def sacrebleu_chrf(hyps: list[str], refs: list[list[str]]) -> float:
    """sacrebleu's corpus chrF; it takes reference streams, padded with None."""
    sacrebleu = pytest.importorskip("sacrebleu")
    n = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n)]
    return sacrebleu.metrics.CHRF().corpus_score(hyps, streams).score


# --------------------------------------------------------------------------- loader


def test_loader_reads_the_tatoeba_file(pairs):
    assert len(pairs) == 5_000
    assert len({p.source for p in pairs}) == 2_597
    assert pairs[0] == TranslationPair("Go.", "Va !", pairs[0].credit)
    assert all(p.credit.startswith("CC-BY 2.0 (France) Attribution: tatoeba.org") for p in pairs)
    text = "".join(p.source + p.target for p in pairs)
    assert not set(text) & {"\u00a0", "\u202f", "\u2009", "\t", "\n"}
    assert all(p.target == p.target.strip() and p.source == p.source.strip() for p in pairs)


def test_loader_makes_typographic_spaces_plain(tmp_path):
    f = tmp_path / "pairs.txt"
    rows = ["Go.\tVa\u00a0!\tc1", "Hi.\tSalut\u202f!\tc2", "Run!\t Cours\u2009! \tc3", ""]
    f.write_text("\n".join(rows), encoding="utf-8")
    got = load_translation_pairs(f)
    assert [p.target for p in got] == ["Va !", "Salut !", "Cours !"]
    assert [p.credit for p in got] == ["c1", "c2", "c3"]
    assert normalize_spaces("\u202fOui\u00a0!\u2009") == "Oui !"


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (b"Go.\tVa !", "expected 3 tab-separated fields"),
        (b"Go.\tVa !\tcredit\textra", "expected 3 tab-separated fields"),
        ("Go.\t\u00a0\tcredit".encode(), "French field is empty"),
        (b" \tVa !\tcredit", "English field is empty"),
        (b"Go.\tVa !\t ", "credit field is empty"),
        (b"Go.\tVa \xff!\tcredit", "not UTF-8"),
    ],
)
def test_loader_names_the_file_and_line_of_a_bad_row(tmp_path, bad_line, problem):
    f = tmp_path / "pairs.txt"
    f.write_bytes(b"Hi.\tSalut !\t" + CREDIT.encode() + b"\n\n" + bad_line + b"\n")
    with pytest.raises(DataFormatError) as info:
        load_translation_pairs(f)
    message = str(info.value)
    assert str(f) in message and "line 3" in message and problem in message
    assert "\n" not in message


def test_loader_rejects_an_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no translation pairs"):
        load_translation_pairs(f)


def test_loader_accepts_a_path_string_and_crlf(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_bytes(b"\xef\xbb\xbfGo.\tVa !\tc1\r\nHi.\tSalut !\tc2\r\n")
    assert load_translation_pairs(str(f)) == [
        TranslationPair("Go.", "Va !", "c1"),
        TranslationPair("Hi.", "Salut !", "c2"),
    ]


# --------------------------------------------------------------------------- split


def test_split_keeps_each_sentence_on_one_side(pairs):
    train, test = split_by_source(pairs, test_fraction=0.2, seed=0)
    train_src, test_src = {p.source for p in train}, {p.source for p in test}
    assert not train_src & test_src
    assert train == [p for p in pairs if p.source not in test_src]  # the rest, in file order
    assert test == [p for p in pairs if p.source in test_src]
    assert len(test_src) == round(2_597 * 0.2) == 519


def test_split_is_deterministic_with_a_seed(pairs):
    assert split_by_source(pairs, seed=0) == split_by_source(pairs, seed=0)
    assert split_by_source(pairs, seed=0)[1] != split_by_source(pairs, seed=1)[1]
    shuffled = random.Random(3).sample(pairs, len(pairs))  # depends on the sentences, not order
    assert {p.source for p in split_by_source(shuffled, seed=0)[1]} == {
        p.source for p in split_by_source(pairs, seed=0)[1]
    }


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_rejects_a_fraction_outside_0_1(pairs, fraction):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_by_source(pairs, test_fraction=fraction)


def test_split_needs_sentences_on_both_sides():
    few = [TranslationPair("Go.", "Va !", CREDIT), TranslationPair("Go.", "Marche.", CREDIT)]
    with pytest.raises(ValueError, match="both need at least one"):
        split_by_source(few, test_fraction=0.2)


def test_references_in_file_order_without_duplicates():
    rows = [("Go.", "Va !"), ("Hi.", "Salut !"), ("Go.", "Marche."), ("Go.", "Va !")]
    refs = references(TranslationPair(s, t, CREDIT) for s, t in rows)
    assert refs == {"Go.": ["Va !", "Marche."], "Hi.": ["Salut !"]}
    assert list(refs) == ["Go.", "Hi."]


def test_translation_example_is_an_instruction():
    ex = translation_example("Go.", "Va !")
    assert ex == InstructionExample(TRANSLATE_INSTRUCTION, "Go.", "Va !")
    assert format_prompt(translation_example("Go."), intro="") == (
        "### Instruction:\nTranslate this sentence into French.\n\n### Input:\nGo.\n\n"
        "### Response:\n"
    )
    with pytest.raises(ValueError, match="non-empty English sentence"):
        translation_example("  ")


def test_language_prompt_names_the_languages_each_way():
    assert language_prompt(translation_example("Go.", "Va !")) == "English: Go.\nFrench: "
    back = back_translation_example("Va !", "Go.")
    assert back == InstructionExample(TRANSLATE_BACK_INSTRUCTION, "Va !", "Go.")
    assert language_prompt(back) == "French: Va !\nEnglish: "
    with pytest.raises(ValueError, match="not a translation example"):
        language_prompt(InstructionExample("Say hi.", "", "hi"))
    with pytest.raises(ValueError, match="non-empty French sentence"):
        back_translation_example("")
    with pytest.raises(TypeError, match="english must be a string"):
        back_translation_example("Va !", None)


# --------------------------------------------------------------------------- scores

CASES = [
    (["Je suis malade."], [["Je suis malade !", "Je suis malade."]]),
    (["Va !", "Salut.", "Cours !"], [["Va !", "Marche."], ["Salut !", "Salut."], ["Courez !"]]),
    (["le chat est noir", "x"], [["le chien est noir", "un chat noir"], ["abc"]]),
    (["Il est parti.", ""], [["Je suis parti.", "Je suis partie."], ["Bonjour !"]]),
    (["ab", "Tom a menti."], [["a"], ["Tom a menti.", "Tom mentait."]]),  # ref shorter than 6
    (["Aide-moi !"], [["À l'aide !", "Au secours !", "Aidez-moi !"]]),
]


@pytest.mark.parametrize("hyps, refs", CASES)
def test_chrf_equals_sacrebleu(hyps, refs):
    assert chrf(hyps, refs) == pytest.approx(sacrebleu_chrf(hyps, refs), abs=1e-9)


@pytest.mark.parametrize("hyps, refs", CASES)
def test_sentence_chrf_equals_sacrebleu(hyps, refs):
    sacrebleu = pytest.importorskip("sacrebleu")
    metric = sacrebleu.metrics.CHRF()
    for h, r in zip(hyps, refs):
        assert sentence_chrf(h, r) == pytest.approx(metric.sentence_score(h, r).score, abs=1e-9)


def test_chrf_of_the_baseline_equals_sacrebleu(baseline):
    hyps, refs = baseline
    assert chrf(hyps, refs) == pytest.approx(sacrebleu_chrf(hyps, refs), abs=1e-9)


def test_chrf_is_100_for_identical_and_0_for_disjoint_text():
    assert chrf(["Je suis malade !", "Va."], [["Je suis malade !"], ["Va."]]) == 100.0
    assert sentence_chrf("Je  suis malade!", ["Je suis malade !"]) == 100.0  # spaces ignored
    assert sentence_chrf("xyz", ["abc"]) == 0.0
    assert sentence_chrf("", ["abc"]) == 0.0


def test_chrf_rejects_malformed_arguments():
    with pytest.raises(ValueError, match="one list of references per hypothesis"):
        chrf(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="wrap a single reference in a list"):
        chrf(["a"], ["a"])
    with pytest.raises(ValueError, match="no reference"):
        chrf(["a"], [[]])
    with pytest.raises(ValueError, match="no hypotheses"):
        chrf([], [])
    with pytest.raises(ValueError, match="char_order"):
        chrf(["a"], [["a"]], char_order=0)


def test_exact_match_accepts_any_reference_and_nothing_else():
    refs = [["Va !", "Marche."], ["Salut !"]]
    assert exact_match(["Marche.", " Salut !\n"], refs) == 1.0
    assert exact_match(["Va\u202f!", "Salut"], refs) == 0.5  # truncated
    assert exact_match(["Va ! !", "Salut !!"], refs) == 0.0  # padded
    assert exact_match(["va !", "Salut  !"], refs) == 0.0  # case and inner spacing count


# --------------------------------------------------------------------------- baseline


@pytest.mark.parametrize(
    "a, b, d",
    [
        ("kitten", "sitting", 3),
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("flaw", "lawn", 2),
        ("Tom", "Tom", 0),
        ("ab", "ba", 2),
        ("intention", "execution", 5),
    ],
)
def test_edit_distance_known_cases(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_edit_distance_matches_the_full_table():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                table[i][j] = min(
                    table[i - 1][j] + 1,
                    table[i][j - 1] + 1,
                    table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
                )
        assert edit_distance(a, b) == table[-1][-1], (a, b)


def test_nearest_neighbour_picks_the_closest_sentence():
    train = [
        TranslationPair("I ran.", "J'ai couru.", CREDIT),
        TranslationPair("I ran.", "Je courais.", CREDIT),
        TranslationPair("I won.", "J'ai gagné.", CREDIT),
        TranslationPair("Help!", "À l'aide !", CREDIT),
        TranslationPair("Hello!", "Bonjour !", CREDIT),
    ]
    got = nearest_neighbour_translations(train, ["I ran!", "Hell!", "I won.", "Ixxx."])
    # "Ixxx." is 3 edits from both "I ran." and "I won.": the first in sorted order wins
    assert got == ["J'ai couru.", "Bonjour !", "J'ai gagné.", "J'ai couru."]


def test_nearest_neighbour_equals_brute_force(pairs):
    train, test = split_by_source(pairs, test_fraction=0.2, seed=0)
    table = references(train)
    cands = sorted(table)
    sources = sorted({p.source for p in test})[::20]  # 26 sentences: brute force is slow
    want = [table[min(cands, key=lambda c: edit_distance(s, c))][0] for s in sources]
    assert nearest_neighbour_translations(train, sources) == want


def test_nearest_sources_leaving_each_sentence_out_equals_brute_force(pairs):
    train, _ = split_by_source(pairs, test_fraction=0.2, seed=0)
    cands = sorted(references(train))
    # the first, the last and every 40th: the ends take the other branch of the bridge
    sources = [cands[0], cands[-1], *cands[1:-1:40]]
    got = nearest_sources(train, sources, leave_out_self=True)
    for s, near in zip(sources, got, strict=True):
        others = [c for c in cands if c != s]
        assert near == min(others, key=lambda c: edit_distance(s, c)), s
    assert nearest_sources(train, sources) == sources  # without leaving out: itself


def test_nearest_sources_leave_out_on_tiny_sets():
    train = [
        TranslationPair("I ran.", "J'ai couru.", CREDIT),
        TranslationPair("I won.", "J'ai gagné.", CREDIT),
        TranslationPair("Help!", "À l'aide !", CREDIT),
    ]
    got = nearest_sources(train, ["I ran.", "I won.", "Help!", "I run."], leave_out_self=True)
    assert got == ["I won.", "I ran.", "I ran.", "I ran."]  # "Help!": 6 from both, sorted first
    with pytest.raises(ValueError, match="only training sentence"):
        nearest_sources(train[:1], ["I ran."], leave_out_self=True)
    with pytest.raises(TypeError, match="not one string"):
        nearest_sources(train, "I ran.")


def test_nearest_neighbour_baseline_figures(baseline):
    hyps, refs = baseline
    assert len(hyps) == 519
    assert exact_match(hyps, refs) == pytest.approx(27 / 519)
    assert chrf(hyps, refs) == pytest.approx(34.2505, abs=1e-4)
