"""Answer metrics (data/answers.py): HotpotQA normalisation, EM and F1 against hand-computed values.

`contains_gold` is tested where it judges: tests/test_measure_memory.py and tests/test_traces.py.
"""
import pytest

from data.answers import exact_match, f1_score, normalize_answer

# --------------------------------------------------------------------------------------- EM / F1


def test_normalize_answer():
    # lower -> "the  eiffel-tower!"; drop punctuation -> "the  eiffeltower"; drop "the"; squeeze
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a whole word


def test_accents_are_folded_so_a_direct_answer_meets_an_ascii_gold():
    """The offline golds are GeoNames ASCII names: "San José" from memory is right."""
    assert normalize_answer("San José") == "san jose" and normalize_answer("Bogotá") == "bogota"
    assert exact_match("San José", ["San Jose"]) == 1.0 and exact_match("Asunción", ["Asuncion"]) == 1.0
    assert exact_match("30,355 km²", ["30,355 km²"]) == 1.0 and exact_match("San José", ["San Juan"]) == 0.0


def test_exact_match_multiple_golds_articles_punctuation():
    assert exact_match("the Paris.", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_f1_hand_computed():
    # pred [barack, obama], gold [obama]: common 1, P = 1/2, R = 1, F1 = 2*(1/2)*1/(3/2) = 2/3
    assert f1_score("Barack Obama", ["Obama"]) == pytest.approx(2 / 3)
    # max over golds: the second gold matches exactly
    assert f1_score("New York City", ["York", "the New York City"]) == 1.0
    assert f1_score("Lyon", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0


def test_f1_yes_no_special_case():
    # plain token F1 would give 2/3 for "yes" vs "yes sir"; the official rule gives 0
    assert f1_score("yes", ["yes sir"]) == 0.0
    assert f1_score("no sir", ["no"]) == 0.0
    assert f1_score("No.", ["no"]) == 1.0
