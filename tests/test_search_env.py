"""LocalSearchEnv: the three tiers, ranking, caps, 'no results', and never raising."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.base import Document, Tool
from envs.search import LocalSearchEnv, normalize, normalize_title, truncate

DOCS = [
    Document("The Beatles", "The Beatles were an English rock band formed in Liverpool in 1960."),
    Document("Barack Obama", "Barack Obama is an American politician who was the 44th president."),
    Document("Obama administration", "The Obama administration began in January 2009."),
    Document("Pelé", "Pelé was a Brazilian footballer, one of the greatest of all time."),
    Document("Liverpool", "Liverpool is a port city in North West England."),
    Document("Liverpool", "Liverpool Football Club plays at Anfield."),
    Document("Anfield", "Anfield is a football stadium; the home ground of the club since 1892."),
    Document("It", "It is a 2017 supernatural horror film."),
]


@pytest.fixture
def env() -> LocalSearchEnv:
    return LocalSearchEnv(DOCS)


def titles(env: LocalSearchEnv, query: str) -> list[str]:
    return [doc.title for doc in env.search(query)]


# --- normalization ------------------------------------------------------------------

def test_normalize_lowercases_strips_accents_punctuation_and_spaces():
    assert normalize("  Pelé's   World-Cup!  ") == "peles world cup"
    assert normalize_title("The Beatles") == "beatles"
    assert normalize_title("An  Apple") == "apple"
    assert normalize_title("The") == "the"  # nothing would be left
    assert normalize_title("Theodore") == "theodore"  # an article only as a whole word


def test_truncate_cuts_at_a_word_boundary_with_an_ellipsis():
    assert truncate("short", 10) == "short"
    assert truncate("one two three four", 12) == "one two…"
    assert truncate("one two three four", 9) == "one two…"  # the cut falls just after "two"
    assert truncate("abcdefghij", 5) == "abcd…"  # no space: hard cut
    assert truncate("abc", 0) == ""


# --- tier 1: exact title ------------------------------------------------------------

@pytest.mark.parametrize("query", ["The Beatles", "the beatles", "BEATLES", "  beatles!!  ", "the  Beatles?"])
def test_exact_title_ignores_case_punctuation_and_article(env, query):
    assert titles(env, query)[0] == "The Beatles"


def test_exact_title_ignores_accents(env):
    assert titles(env, "pele")[0] == "Pelé"
    assert titles(env, "PELÉ")[0] == "Pelé"


def test_exact_title_beats_better_content_match(env):
    # "anfield" is in the text of the second Liverpool document, but the title wins.
    assert titles(env, "Anfield")[0] == "Anfield"


def test_single_stopword_title_is_found_exactly_but_not_inside_questions(env):
    assert titles(env, "It") == ["It"]
    assert env("what is it") == "No results for 'what is it'."


# --- tier 2: partial title ----------------------------------------------------------

def test_query_inside_titles_of_equal_length_ranks_alphabetically(env):
    assert titles(env, "obama") == ["Barack Obama", "Obama administration"]


def test_query_inside_title_ranks_shorter_title_first():
    env = LocalSearchEnv([Document("Ann Obama Presidential Library", "x"), Document("Obama Center", "y")])
    assert titles(env, "obama") == ["Obama Center", "Ann Obama Presidential Library"]


def test_title_inside_query_is_found(env):
    assert titles(env, "When was Barack Obama born?")[0] == "Barack Obama"


def test_partial_match_needs_whole_words(env):
    # "beat" is part of "Beatles" but not a word of it; no text has it either.
    assert env.search("beat") == []


def test_more_words_in_common_rank_first():
    docs = [Document("Obama", "a"), Document("Barack Obama Sr", "b")]
    env = LocalSearchEnv(docs)
    # query inside "Barack Obama Sr" (2 words in common) beats "Obama" inside the query (1 word)
    assert titles(env, "barack obama") == ["Barack Obama Sr", "Obama"]


# --- tier 3: content ----------------------------------------------------------------

def test_content_match_ranks_by_bm25(env):
    assert titles(env, "football stadium")[0] == "Anfield"
    assert titles(env, "English rock band") == ["The Beatles"]


def test_content_fills_up_after_title_hits(env):
    # exact title hits (two documents titled Liverpool), then The Beatles by content
    assert titles(env, "liverpool") == ["Liverpool", "Liverpool", "The Beatles"]


def test_content_ties_go_to_the_earlier_document():
    docs = [Document(f"Doc {i}", "same words here") for i in range(5)]
    env = LocalSearchEnv(docs, top_k=3)
    assert titles(env, "same words") == ["Doc 0", "Doc 1", "Doc 2"]


# --- ranking, top_k, format, caps ---------------------------------------------------

def test_observation_format(env):
    assert env("beatles").splitlines()[0] == (
        "[The Beatles] The Beatles were an English rock band formed in Liverpool in 1960."
    )


def test_same_query_gives_identical_output(env):
    first = env("liverpool football club")
    assert all(env("liverpool football club") == first for _ in range(5))
    assert LocalSearchEnv(DOCS)("liverpool football club") == first  # a rebuilt index too


def test_top_k_limits_hits():
    env = LocalSearchEnv(DOCS, top_k=1)
    assert titles(env, "liverpool") == ["Liverpool"]
    assert len(env("liverpool").splitlines()) == 1
    assert len(LocalSearchEnv(DOCS, top_k=10).search("liverpool")) == 3  # 2 titles + 1 text


def test_snippet_is_cut_at_word_boundary():
    env = LocalSearchEnv([Document("Long", "word " * 100)], snippet_chars=22)
    assert env("long") == "[Long] word word word word…"


def test_observation_is_capped_at_max_chars():
    docs = [Document(f"Topic {i}", "alpha " * 60) for i in range(3)]
    env = LocalSearchEnv(docs, max_chars=100, snippet_chars=60)
    out = env("alpha")
    assert len(out) <= 100
    lines = out.splitlines()
    assert lines[0] == "[Topic 0] " + "alpha " * 9 + "alpha…"  # a whole hit: 60-char snippet
    assert lines[1] == "[Topic 1] alpha alpha alpha…"  # cut to the 29 chars left
    assert len(lines) == 2  # no room for Topic 2


def test_tiny_max_chars_still_shows_the_first_hit():
    out = LocalSearchEnv(DOCS, max_chars=12)("beatles")
    assert out == "[The…"


# --- no results, odd input ----------------------------------------------------------

@pytest.mark.parametrize("query", ["", "   ", "?!...", "zzqx unknownword", "日本語", "🙂🙂", "\n\t"])
def test_no_results(env, query):
    out = env(query)
    assert out.startswith("No results for '") and out.endswith("'.")
    assert env.search(query) == []


def test_no_results_echo_is_short_and_one_line(env):
    out = env("qqq\nzzz " * 1000)
    assert out.startswith("No results for 'qqq zzz qqq zzz")
    assert "\n" not in out and len(out) < 120


def test_non_string_queries_do_not_raise(env):
    assert env(None) == "No results for 'None'."
    assert env(12345) == "No results for '12345'."

    class Broken:
        def __str__(self):
            raise RuntimeError

    assert env(Broken()) == "No results for ''."


def test_empty_collection_has_no_results():
    env = LocalSearchEnv([])
    assert env("beatles") == "No results for 'beatles'."
    assert LocalSearchEnv([Document("", "")])("anything") == "No results for 'anything'."


# --- duplicates, construction -------------------------------------------------------

def test_duplicate_titles_are_each_retrievable_by_content(env):
    assert env.search("port city")[0] == DOCS[4]
    assert env.search("Football Club")[0] == DOCS[5]


def test_tool_protocol_and_description(env):
    assert isinstance(env, Tool)
    assert env.name == "search"
    assert "\n" not in env.description and "3" in env.description


@pytest.mark.parametrize("option, value", [("top_k", 0), ("max_chars", 0), ("snippet_chars", -5),
                                           ("top_k", 2.5)])
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=rf"{option} .*{value}"):
        LocalSearchEnv(DOCS, **{option: value})


@settings(max_examples=300, deadline=None)
@given(query=st.text(), max_chars=st.integers(1, 700))
def test_any_text_query_returns_a_capped_string(query, max_chars):
    out = LocalSearchEnv(DOCS, max_chars=max_chars)(query)
    assert isinstance(out, str) and 0 < len(out) <= max_chars
