"""Tests of the SFT cold-start traces (data/traces.py).

Observations are checked against a fresh env (never against the generator's own output), the
format against `parse_completion`, the answer check against `normalize_answer`. The HotpotQA
test reads ../shared/data/hotpotqa/train_distractor_100.jsonl and skips when it is absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from data.answers import contains_gold, normalize_answer
from data.offline_task import build_offline_task
from data.thoughts import closed_book_replies, demote_half_known, own_words, recall_sentence, recall_without_continent
from data.traces import (STYLES, Trace, bare, build_trace, check_continent, cli_traces, draw_traces, hotpotqa_traces, main,
                         make_traces, offline_traces, quotas, read_traces, unknown_memory, write_traces)
from data.types import LOOKUP, MEMORY
from envs.base import Document
from envs.protocol import parse_completion
from envs.sandbox import run_tool
from envs.search import LocalSearchEnv

REPO = Path(__file__).resolve().parents[1]
HOTPOTQA_TRAIN = REPO.parent / "shared" / "data" / "hotpotqa" / "train_distractor_100.jsonl"
N = 120


@pytest.fixture(scope="module")
def task():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the memory measurement may be absent here
        return build_offline_task(0)


@pytest.fixture(scope="module")
def env(task):
    return LocalSearchEnv(task.documents)


@pytest.fixture(scope="module")
def traces(task, env):
    return make_traces(task.train, env, n=N, seed=0)


@pytest.fixture(scope="module")
def by_id(task):
    return {ex.id: ex for ex in task.train}


def example_of(trace, by_id):
    return by_id[trace.id.split("/", 1)[1]]


def obs_texts(trace):
    return [text for role, text in trace.segments if role == "obs"]


# --------------------------------------------------------------------------- determinism and mix

def digest(traces) -> str:
    return hashlib.sha256(json.dumps([[t.id, t.segments] for t in traces]).encode()).hexdigest()


def test_same_seed_same_traces_other_seed_differs(task, env, traces):
    assert make_traces(task.train, env, n=N, seed=0) == traces
    other = make_traces(task.train, env, n=N, seed=1)
    assert [t.id for t in other] != [t.id for t in traces]


def test_same_traces_in_another_process(traces):
    code = ("import warnings, json, hashlib; warnings.simplefilter('ignore')\n"
            "from data.traces import offline_traces\n"
            f"t = offline_traces(n={N}, seed=0)\n"
            "print(hashlib.sha256(json.dumps([[x.id, x.segments] for x in t]).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == digest(traces)


def test_quotas_sum_to_n_by_largest_remainder():
    assert quotas(10, (1, 1, 1)) == {"direct": 4, "search": 3, "multihop": 3}
    assert quotas(7, (1, 3, 1)) == {"direct": 2, "search": 4, "multihop": 1}  # 1.4, 4.2, 1.4: tie -> first
    assert quotas(9, (1, 3, 1)) == {"direct": 2, "search": 5, "multihop": 2}  # 1.8, 5.4, 1.8
    for n in range(30):
        for mix in [(1, 1, 1), (0.2, 0.6, 0.2), (0.0, 0.3, 0.7), (5, 1, 0)]:
            counts = quotas(n, mix)
            assert sum(counts.values()) == n
            assert all(abs(counts[s] - n * m / sum(mix)) < 1 for s, m in zip(STYLES, mix)), (n, mix)
    with pytest.raises(ValueError, match="mix"):
        quotas(10, (1, 1))
    with pytest.raises(ValueError, match="n must"):
        quotas(-1, (1, 1, 1))


@pytest.mark.parametrize("mix", [(0.2, 0.6, 0.2), (0.5, 0.25, 0.25), (0.0, 0.3, 0.7)])
def test_mix_proportions(task, env, mix):
    n = 101
    traces = make_traces(task.train, env, n=n, mix=mix, seed=3)
    assert len(traces) == n
    for style, share in zip(STYLES, mix):
        assert abs(sum(t.style == style for t in traces) - n * share) <= 1, style
    assert len({t.id for t in traces}) == n  # no example is used twice


def test_short_style_warns_and_is_filled_by_the_others(task, env):
    few_memory = [ex for ex in task.train if ex.kind == MEMORY][:3]
    examples = few_memory + [ex for ex in task.train if ex.kind == LOOKUP]
    with pytest.warns(UserWarning, match="only 3 direct traces of the 25"):
        traces = make_traces(examples, env, n=50, mix=(0.5, 0.5, 0.0), seed=0)
    styles = [t.style for t in traces]
    assert len(traces) == 50 and styles.count("direct") == 3
    assert styles.count("search") == 47 and styles.count("multihop") == 0  # a zero share is never used


def test_offline_traces_only_use_the_training_split_of_their_seed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_ids = {ex.id for ex in build_offline_task(1).train}
        traces = offline_traces(n=80, seed=1)  # the split seed follows the seed unless task_seed is given
    assert len(traces) == 80 and all(t.id.split("/", 1)[1] in train_ids for t in traces)


# --------------------------------------------------------------------------- format and content

def test_every_trace_well_formed_with_the_style_call_count(traces, by_id):
    assert {t.style for t in traces} == set(STYLES)
    for trace in traces:
        parsed = parse_completion(trace.text)
        example = example_of(trace, by_id)
        assert parsed.well_formed, (trace.id, parsed.reason)
        assert parsed.answer == example.answers[0]
        expected_calls = {"direct": 0, "search": 1, "multihop": 2}[trace.style]
        assert parsed.num_calls == expected_calls == len(obs_texts(trace)), trace.id
        assert parsed.calls == (example.hops if trace.style != "direct" else ())
        assert "<|im_end|>" not in trace.text and "<|endoftext|>" not in trace.text
        assert trace.text.startswith("<thought>") and trace.segments[-1][0] == "model"


def test_every_observation_is_what_the_env_returns(task, traces):
    fresh = LocalSearchEnv(task.documents)
    checked = 0
    for trace in traces:
        query = None
        for role, text in trace.segments:
            if role == "model":
                calls = parse_completion(text + "<obs>x</obs><answer>x</answer>").calls
                query = calls[-1] if calls else None
            else:
                assert query is not None, f"{trace.id}: an observation not after a call"
                assert text == run_tool(fresh, query)[0], (trace.id, query)
                query, checked = None, checked + 1
    assert checked >= N // 2


def test_offline_search_traces_hold_the_gold_in_their_observations(traces):
    for trace in traces:
        if trace.style != "direct":
            observed = f" {normalize_answer(' '.join(obs_texts(trace)))} "
            assert any(f" {normalize_answer(g)} " in observed for g in trace.answers), trace.id


def test_gold_missing_from_the_observations_is_skipped_and_counted(task):
    currency = [ex for ex in task.train if ex.type == "currency"][:5]
    blank = LocalSearchEnv([Document(d.title, "No facts here.") for d in task.documents])
    with pytest.warns(UserWarning) as caught:
        traces, report = draw_traces(currency, blank, {"search": 5}, seed=0)
    assert [str(w.message).split(" (")[0] for w in caught] == ["only 0 search traces of the 5 requested",
                                                                "5 traces short of the 5 requested"]
    assert traces == [] and report.skipped == {"search: gold not in the observations": 5}


def test_direct_traces_only_from_memory_questions(task, env, traces, by_id):
    assert all(example_of(t, by_id).kind == MEMORY for t in traces if t.style == "direct")
    # capitals the model was measured not to know are searched, never answered directly
    unknown = [replace(ex, kind=LOOKUP) if ex.type == "capital" else ex for ex in task.train]
    other = make_traces(unknown, env, n=300, seed=0)
    assert not any(t.style == "direct" and t.type == "capital" for t in other)
    capital_searches = [t for t in other if t.style == "search" and t.type == "capital"]
    assert capital_searches and all(t.kind == LOOKUP for t in capital_searches)


# --------------------------------------------------------------------------- recall thoughts, knowing vs type

def thought_of(trace) -> str:
    return trace.segments[0][1].split("<thought>")[1].split("</thought>")[0]


def test_own_words_cuts_the_reply_to_the_clause_stating_the_gold():
    reply = ("Chad is a continent located in the Eastern Africa region of the continent of Africa, which is "
             "bordered by the Democratic Republic of the Congo. It is large.")
    assert own_words(reply, ("Africa",), "Chad") == ("Chad is a continent located in the Eastern Africa region "
                                                     "of the continent of Africa.")
    assert own_words("It is big. The capital of Greece is Athens.", ("Athens",), "Greece") == \
        "The capital of Greece is Athens."
    # the gold inside the subject's own name does not count; a reply without the gold gives None
    assert own_words("The capital of Singapore is not a place.", ("Singapore",), "Singapore") is None
    assert own_words("The capital of Djibouti is Djibouti.", ("Djibouti",), "Djibouti") == \
        "The capital of Djibouti is Djibouti."
    assert own_words("The capital of Armenia is called Yerekav.", ("Yerevan",), "Armenia") is None


def test_recall_sentence_falls_back_to_a_template(task):
    capital = next(ex for ex in task.train if ex.type == "capital")
    continent = next(ex for ex in task.train if ex.type == "continent")
    assert recall_sentence(capital, {}) == f"The capital of {capital.hops[0]} is {capital.answers[0]}."
    assert recall_sentence(continent, {continent.id: "No idea."}) == f"{continent.hops[0]} is in {continent.answers[0]}."
    assert recall_sentence(capital, {capital.id: f"Well. The capital is {capital.answers[0]}, I think."}) == \
        f"The capital is {capital.answers[0]}."


def test_direct_thoughts_state_the_gold_in_the_models_own_words(task, env, by_id):
    replies = closed_book_replies()
    if not replies:
        pytest.skip("data/smollm2_memory.json is absent")
    traces = make_traces(task.train, env, n=200, seed=0)  # default: recall thoughts
    direct = [t for t in traces if t.style == "direct"]
    assert len(direct) == 60
    own = 0
    for t in direct:
        thought = thought_of(t)
        subject = example_of(t, by_id).hops[0]
        assert contains_gold(thought.replace(subject, " ", 1), t.answers[:1]), thought
        assert thought.endswith(".") and len(thought.split()) <= 25
        # most of them are the model's own closed-book reply (a cut of it), not the template
        own += normalize_answer(thought) in normalize_answer(replies[example_of(t, by_id).id])
    assert own >= 0.9 * len(direct)
    plain = make_traces(task.train, env, n=200, seed=0, direct_thought="plain")
    assert {thought_of(t) for t in plain if t.style == "direct"} <= \
        {"I know this.", "I know this one.", "I know the answer."}
    with pytest.raises(ValueError, match="direct_thought"):
        make_traces(task.train, env, n=10, direct_thought="loud")


def test_unknown_share_searches_the_capitals_and_continents_the_model_does_not_know(task, env, by_id):
    assert sum(unknown_memory(ex) for ex in task.train) > 50  # many capitals/continents are not known
    traces = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4)
    searched = [t for t in traces if t.style == "search"]
    searched_unknown = [t for t in searched if unknown_memory(example_of(t, by_id))]
    assert len(searched) == 160 and len(searched_unknown) == 64  # 0.4 of the search count
    assert all(t.kind == LOOKUP for t in searched_unknown)
    assert {t.type for t in searched} - {"capital", "continent"}  # the other lookups keep their traces
    # capitals/continents are both answered and searched: their type does not decide
    for type_ in ("capital", "continent"):
        styles = Counter(t.style for t in traces if t.type == type_)
        assert styles["direct"] > 0 and styles["search"] > 0
    baseline = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.0)
    assert sum(unknown_memory(example_of(t, by_id)) for t in baseline if t.style == "search") < len(searched_unknown)
    with pytest.raises(ValueError, match="unknown_share"):
        make_traces(task.train, env, n=10, unknown_share=1.5)


def test_hedged_searches_fork_from_the_recall_at_the_fact(task, env, by_id):
    traces = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4,
                         unknown_thought="hedge")
    hedged = [t for t in traces if t.style == "search" and unknown_memory(example_of(t, by_id))]
    assert len(hedged) == 64
    for t in hedged:
        country = example_of(t, by_id).hops[0]
        prefix = {"capital": f"The capital of {country} is ", "continent": f"{country} is a country located in "}[t.type]
        thought = thought_of(t)
        # same words as a recall up to the fact, then it gives up and names the query it will send
        assert thought.startswith(prefix) and thought.endswith(f"I will search for {country}.")
        assert not contains_gold(thought.replace(country, " "), t.answers)
        assert parse_completion(t.text).calls == (country,)
    # the other searches keep the generic thoughts; "plain" gives them to the unknown ones too
    others = [t for t in traces if t.style in ("search", "multihop") and t not in hedged]
    assert others and not any("something I know" in t.text or "part of the world" in t.text for t in others)
    plain = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4, unknown_thought="plain")
    assert [t.id for t in plain] == [t.id for t in traces]
    assert not any("something I know" in t.text or "part of the world" in t.text for t in plain)
    with pytest.raises(ValueError, match="unknown_thought"):
        make_traces(task.train, env, n=10, unknown_thought="shy")


def test_hedge_all_leaves_no_generic_one_hop_search(task, env, by_id):
    traces = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4)  # the default
    searches = [t for t in traces if t.style == "search"]
    assert len(searches) == 160 and {t.type for t in searches} >= {"population", "currency", "bridge", "capital"}
    for t in searches:
        hop = example_of(t, by_id).hops[0]
        thought = thought_of(t)
        assert "not something I know" in thought or "part of the world" in thought, thought
        assert thought.endswith(f"I will search for {hop}.") and not thought.startswith("I ")
        assert not contains_gold(thought.replace(hop, " "), t.answers)
    # direct and two-hop traces are those of "hedge"
    hedge = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4, unknown_thought="hedge")
    assert [t.text for t in traces if t.style != "search"] == [t.text for t in hedge if t.style != "search"]


def test_recall_without_continent_keeps_a_first_clause_that_names_none():
    reply = "Guadeloupe is a French island located in the Atlantic Ocean, near Dominica. It is warm."
    assert recall_without_continent(reply, "Guadeloupe") == \
        "Guadeloupe is a French island located in the Atlantic Ocean."
    assert recall_without_continent("Kuwait is a country located in the Middle East.", "Kuwait") == \
        "Kuwait is a country located in the Middle East."
    # a continent named, even a wrong one or as an adjective, is a recall to answer from, not to search after
    assert recall_without_continent("Georgia is a state located in the continent of Africa.", "Georgia") is None
    assert recall_without_continent("Malta is a European country in the Mediterranean Sea.", "Malta") is None
    assert recall_without_continent("Kyrgyzstan is a member of the Eurasian continent.", "Kyrgyzstan") is None
    # about another country, garbled, too short or too long: nothing to recall
    assert recall_without_continent("Luxembourg is a member of the EU.", "Slovenia") is None
    assert recall_without_continent("Barb = 1", "Barbados") is None
    assert recall_without_continent("Chad exists.", "Chad") is None
    assert recall_without_continent("Chad is " + "a very " * 12 + "big place.", "Chad") is None


def test_recall_search_thinks_the_recall_then_searches_only_continents(task, env):
    continent = next(ex for ex in task.train if ex.type == "continent" and ex.kind == LOOKUP)
    capital = next(ex for ex in task.train if ex.type == "capital" and ex.kind == LOOKUP)
    country = continent.hops[0]
    replies = {continent.id: f"{country} is a small island located in the Atlantic Ocean, far away.",
               capital.id: f"{capital.hops[0]} is a small island located in the Atlantic Ocean."}
    trace = build_trace(continent, "search", env, random.Random(0), replies, recall_search=True)
    assert thought_of(trace) == (f"{country} is a small island located in the Atlantic Ocean. "
                                 f"That does not say which continent; I will search for {country}.")
    parsed = parse_completion(trace.text)
    assert parsed.well_formed and parsed.calls == (country,) and parsed.answer == continent.answers[0]
    assert obs_texts(trace) == [run_tool(env, country)[0]]
    # off, a reply naming a continent, or a capital question: the hedge-all thought as before
    hedge = build_trace(continent, "search", env, random.Random(0), replies)
    assert thought_of(hedge) == f"{country} is a country located in a part of the world I do not know; " \
                                f"I will search for {country}."
    naming = {continent.id: f"{country} is a country located in Europe."}
    assert thought_of(build_trace(continent, "search", env, random.Random(0), naming, recall_search=True)) == \
        thought_of(hedge)
    assert "does not say" not in build_trace(capital, "search", env, random.Random(0), replies,
                                             recall_search=True).text
    with pytest.raises(ValueError, match="recall_search"):
        make_traces(task.train, env, n=10, direct_thought="plain", recall_search=True)


def test_recall_search_changes_only_the_thoughts_of_continent_searches(task, env, by_id):
    replies = closed_book_replies()
    if not replies:
        pytest.skip("data/smollm2_memory.json (the base model's closed-book replies) is absent")
    base = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4)
    recall = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4, recall_search=True)
    assert [t.id for t in recall] == [t.id for t in base]
    changed = [(a, b) for a, b in zip(base, recall) if a.text != b.text]
    assert changed
    for old, new in changed:
        example = example_of(new, by_id)
        assert new.type == "continent" and new.style == "search" and "part of the world" in old.text
        first = recall_without_continent(replies[example.id], example.hops[0])
        assert thought_of(new) == f"{first} That does not say which continent; I will search for {example.hops[0]}."
        assert old.segments[1:] == new.segments[1:]  # same search, observations and answer


def test_continent_check_ends_both_recalls_with_the_same_clause(task, env):
    continent = next(ex for ex in task.train if ex.type == "continent" and ex.kind == LOOKUP)
    country, gold = continent.hops[0], continent.answers[0]
    replies = {continent.id: f"{country} is a small island located in the Atlantic Ocean, far away."}
    search = build_trace(continent, "search", env, random.Random(0), replies, recall_search=True)
    checked = check_continent(search)
    assert thought_of(checked) == (f"{country} is a small island located in the Atlantic Ocean. "
                                   f"So its continent is not stated; I will search for {country}.")
    assert checked.segments[1:] == search.segments[1:] and checked.id == search.id
    assert parse_completion(checked.text).calls == (country,)
    direct = build_trace(continent, "direct", env, random.Random(0), {continent.id: f"{country} is in {gold}."})
    assert check_continent(direct).segments == (
        ("model", f"<thought>{country} is in {gold}. So its continent is {gold}.</thought><answer> {gold}</answer>"),)
    # a hedge that recalled nothing, another type, a multihop: unchanged
    hedge = build_trace(continent, "search", env, random.Random(0), replies)
    assert check_continent(hedge) == hedge
    capital = next(ex for ex in task.train if ex.type == "capital" and ex.kind == MEMORY)
    known = build_trace(capital, "direct", env, random.Random(0), {})
    assert check_continent(known) == known


def test_missed_searches_find_nothing_and_answer_from_memory(task, env, by_id):
    kept = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4)
    traces = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, unknown_share=0.4, miss_share=0.25)
    missed = [t for t in traces if t.id.startswith("miss/")]
    assert len(missed) == 16  # a quarter of the 64 searches of unknown capitals/continents
    for t in missed:
        example = example_of(t, by_id)
        country, gold = example.hops[0], example.answers[0]
        assert t.style == "search" and unknown_memory(example)
        assert obs_texts(t) == [f"No results for '{country}'."]  # what the env says when nothing matches
        recall = {"capital": f"The capital of {country} is {gold}.", "continent": f"{country} is in {gold}."}[t.type]
        assert t.segments[-1] == ("model", "<thought>The search found nothing, so I answer from memory. "
                                           f"{recall}</thought><answer> {gold}</answer>")
        parsed = parse_completion(t.text)
        assert parsed.well_formed and parsed.calls == (country,) and parsed.answer == gold
    assert LocalSearchEnv(task.documents)("Romeo and Juliet") == "No results for 'Romeo and Juliet'."
    # the same draw otherwise: the missed ones replace their own searches, the rest are unchanged
    assert sorted(t.id.split("/", 1)[1] for t in traces) == sorted(t.id.split("/", 1)[1] for t in kept)
    assert [t for t in traces if t not in missed] == [t for t in kept if f"miss/{t.id.split('/', 1)[1]}"
                                                      not in {m.id for m in missed}]
    with pytest.raises(ValueError, match="miss_share"):
        make_traces(task.train, env, n=10, miss_share=1.5)
    direct = next(t for t in traces if t.style == "direct")
    with pytest.raises(ValueError, match="only a one-search trace can miss"):
        build_trace(example_of(direct, by_id), "direct", env, random.Random(0), miss=True)


def test_text_property_matches_the_segments(traces):
    trace = Trace("search/x", "Q?", ("B",), LOOKUP, "search",
                  (("model", "<thought>t</thought><call>A</call>"), ("obs", "[A] B."), ("model", "<answer>B</answer>")))
    assert trace.text == "<thought>t</thought><call>A</call><obs>[A] B.</obs><answer>B</answer>"
    for t in traces:
        assert t.text == "".join(x if r == "model" else f"<obs>{x}</obs>" for r, x in t.segments)
    with pytest.raises(ValueError, match="role"):
        Trace("x", "Q?", ("B",), LOOKUP, "search", (("user", "hi"),))


# --------------------------------------------------------------------------- files

def test_write_read_round_trip(traces, tmp_path):
    path = tmp_path / "sub" / "traces.jsonl"
    write_traces(traces, path)
    assert read_traces(path) == traces
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(traces) and not list(path.parent.glob("*.tmp"))
    row = json.loads(lines[0])
    assert row["text"] == traces[0].text and row["segments"] == [list(s) for s in traces[0].segments]
    assert "km²" in path.read_text(encoding="utf-8")  # ensure_ascii=False: readable as written


def test_read_errors_name_file_line_and_field(traces, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = path.with_name("good.jsonl")
    write_traces(traces[:2], good)
    first, second = good.read_text(encoding="utf-8").splitlines()
    row = json.loads(second)
    del row["segments"]
    path.write_text(first + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 2: missing field 'segments'"):
        read_traces(path)
    path.write_text(first + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: invalid JSON"):
        read_traces(path)
    edited = json.loads(first)
    edited["text"] = edited["text"].replace("<answer>", "<answer>not ")
    path.write_text(json.dumps(edited) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: field 'text' does not match"):
        read_traces(path)


def test_every_slot_has_a_space_before_what_it_copies(task, env, traces):
    # the answer's first word and the query's are then the word-initial tokens the thought or the
    # observation holds (" Athens", " Latvia"), not a re-spelling ("At" + "hens")
    missed = make_traces(task.train, env, n=320, mix=(0.3, 0.5, 0.2), seed=0, miss_share=1.0)
    for t in [*traces, *missed]:
        role, last = t.segments[-1]
        assert role == "model" and (last.endswith(f"</thought><answer> {t.answers[0]}</answer>")
                                    or last == f"<answer> {t.answers[0]}</answer>"), last
        parsed = parse_completion(t.text)
        assert t.text.count("<answer>") == 1 and parsed.answer == t.answers[0]
        assert t.text.count("<call> ") == t.text.count("<call>") == len(parsed.calls)
        assert "".join(text for role, text in t.segments if role == "model").count("<call> ") == len(parsed.calls)


def test_bare_drops_only_the_space_after_the_chosen_tags(traces):
    searches = [t for t in traces if t.style != "direct"]
    assert searches
    for t in traces:
        old = bare(t)
        assert old.text == t.text.replace("<answer> ", "<answer>").replace("<call> ", "<call>")
        assert obs_texts(old) == obs_texts(t) and [r for r, _ in old.segments] == [r for r, _ in t.segments]
        assert parse_completion(old.text) == parse_completion(t.text)
        assert (old.id, old.question, old.answers, old.style) == (t.id, t.question, t.answers, t.style)
        assert bare(t, ["call"]).text == t.text.replace("<call> ", "<call>")
        assert bare(t, ["answer"]).text == t.text.replace("<answer> ", "<answer>")
        assert bare(t, []) == t
    obs_like = Trace("search/x", "q?", ("B",), LOOKUP, "search",
                     (("model", "<thought>t</thought><call> A</call>"), ("obs", "[A] see <answer> B <call> C"),
                      ("model", "<answer> B</answer>")))
    assert bare(obs_like).segments[1] == ("obs", "[A] see <answer> B <call> C")  # observations are never edited
    with pytest.raises(ValueError, match="'obs'"):
        bare(obs_like, ["obs"])


def test_command_line_writes_a_readable_file(tmp_path, capsys):
    out = tmp_path / "traces.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--out", str(out), "--n", "20", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "20 traces: direct 6, search 10, multihop 4" in printed and "skipped: none" in printed
    assert "sample search/" in printed and len(read_traces(out)) == 20
    plain = tmp_path / "bare.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["--out", str(plain), "--n", "20", "--seed", "1", "--bare", "answer", "call"])
    assert [t.text for t in read_traces(plain)] == [bare(t).text for t in read_traces(out)]
    assert all("<answer> " in t.text for t in read_traces(out))


# --------------------------------------------------------------------------- HotpotQA

def test_hotpotqa_traces_query_the_supporting_titles():
    if not HOTPOTQA_TRAIN.is_file():
        pytest.skip(f"HotpotQA sample not found at {HOTPOTQA_TRAIN} (see ../shared/data/README.md)")
    from data.hotpotqa import hotpotqa_documents, load_hotpotqa

    examples = {ex.id: ex for ex in load_hotpotqa(str(HOTPOTQA_TRAIN))}
    fresh = LocalSearchEnv(hotpotqa_documents(examples.values()))
    traces = hotpotqa_traces(str(HOTPOTQA_TRAIN), n=20, seed=0)
    assert len(traces) == 20
    for trace in traces:
        example = examples[trace.id.removeprefix("multihop/hotpotqa/")]
        parsed = parse_completion(trace.text)
        assert trace.style == "multihop" and trace.type == f"hotpotqa/{example.type}"
        assert parsed.well_formed and parsed.answer == example.answers[0]
        assert parsed.calls == example.supporting_titles and len(parsed.calls) >= 2
        assert obs_texts(trace) == [run_tool(fresh, q)[0] for q in example.supporting_titles]


def test_half_known_memory_questions_get_hedged_searches_not_direct_answers(task, env):
    """Memory questions sampled right less than half the time become LOOKUP for the draw: no direct
    trace of theirs, and their searches hedge like an unknown capital's."""
    memory = sorted((ex for ex in task.train if ex.kind == MEMORY), key=lambda e: e.id)[:6]
    sampled = {memory[0].id: 0.25, memory[1].id: 0.5, memory[2].id: 0.0, memory[3].id: 0.75}  # 4, 5: not measured
    out = demote_half_known(memory + [ex for ex in task.train if ex.kind == LOOKUP][:2], sampled, 0.5)
    assert [ex.kind for ex in out[:6]] == [LOOKUP, MEMORY, LOOKUP, MEMORY, MEMORY, MEMORY]
    assert all(ex.kind == LOOKUP for ex in out[6:]) and [ex.id for ex in out[:6]] == [ex.id for ex in memory]
    assert all(ex.kind == MEMORY for ex in memory)                                    # the task is not changed
    traces = draw_traces(out[:6], env, {"direct": 6, "search": 6}, seed=0, fill=False, unknown_thought="hedge-all",
                         replies=closed_book_replies())[0]
    by_id = {t.id.split("/", 1)[1]: t for t in traces}
    assert by_id[memory[0].id].style == by_id[memory[2].id].style == "search" and by_id[memory[3].id].style == "direct"
    assert "not something I know" in thought_of(by_id[memory[0].id])                 # hedged at its fact
    assert demote_half_known(memory, sampled, 0.0) == memory
    with pytest.raises(ValueError, match="min_sampled"):
        demote_half_known(memory, sampled, 1.5)


# --------------------------------------------------------------------------- general knowledge

def test_general_traces_fork_at_the_fact_token_and_search_the_title():
    from data.general_qa import ENTRIES, documents
    from data.traces import general_trace

    faust = next(e for e in ENTRIES if e.title == "Faust")
    env = LocalSearchEnv(documents())
    known, unknown = general_trace(faust, MEMORY, env), general_trace(faust, LOOKUP, env)
    assert known.text == ("<thought>The author of Faust is Johann Wolfgang von Goethe.</thought>"
                          "<answer> Johann Wolfgang von Goethe</answer>")
    assert unknown.text.startswith("<thought>The author of Faust is not something I know; I will search for "
                                   "Faust.</thought><call> Faust</call><obs>[Faust] Faust is a tragic play")
    # both branches share the recall, then part at the fact token
    shared = os.path.commonprefix([known.text, unknown.text])
    assert shared == "<thought>The author of Faust is "
    parsed = parse_completion(unknown.text)
    assert parsed.well_formed and parsed.calls == ("Faust",) and parsed.answer == "Johann Wolfgang von Goethe"
    assert (known.id, known.style, unknown.id, unknown.style) == ("direct/general/Faust", "direct",
                                                                  "search/general/Faust", "search")
    assert unknown.segments[1] == ("obs", run_tool(env, "Faust")[0])


def test_general_memory_adds_one_trace_per_training_entry(tmp_path):
    from data.general_qa import entries

    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps({"results": {"general/Frankenstein": {"greedy_correct": True}}}))
    base, _ = cli_traces(20, (0.3, 0.5, 0.2), seed=1)
    mixed, _ = cli_traces(20, (0.3, 0.5, 0.2), seed=1, general_memory=str(memory))
    general = [t for t in mixed if "/general/" in t.id]
    assert len(mixed) == 20 + len(entries("train")) == len(base) + len(general)
    assert sorted(t.id for t in mixed if "/general/" not in t.id) == sorted(t.id for t in base)
    assert [t.id for t in general if t.style == "direct"] == ["direct/general/Frankenstein"]
