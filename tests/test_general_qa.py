"""The general-knowledge question bank (data/general_qa.py): answerable by its tool, unseen by the probe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.answers import contains_gold
from data.general_qa import ENTRIES, documents, entries, examples, kinds_from_memory, main
from data.questions import read_questions
from data.types import LOOKUP, MEMORY
from envs.search import LocalSearchEnv

PROBE = Path(__file__).parents[1] / "results" / "questions" / "probe_general.jsonl"


def test_every_document_states_an_answer_and_a_search_for_the_title_finds_it():
    env = LocalSearchEnv(documents(), top_k=1)
    for e in ENTRIES:
        assert contains_gold(e.text, e.answers), e.title
        assert env(e.title).startswith(f"[{e.title}]"), e.title


def test_ids_titles_and_recalls_are_well_formed():
    assert len({e.title for e in ENTRIES}) == len(ENTRIES)
    for e in ENTRIES:
        assert e.question.endswith("?") and e.answers, e.title
        # the recall stops right before the fact: "<...> is" (then the fact, or "not something I know")
        assert e.recall[0].isupper() and e.recall.endswith(" is"), e.recall


def test_a_search_with_a_probe_question_finds_none_of_its_answers():
    """The probe stays outside what the tool covers: a search with the probe's question (or its
    words: BM25 ranks on any shared word) returns no document that holds one of its answers."""
    env = LocalSearchEnv(documents(), top_k=3)
    leaks = [(ex.question, env(ex.question)) for ex in read_questions(PROBE)
             if contains_gold(env(ex.question), ex.answers)]
    assert leaks == []


def test_examples_take_their_kind_from_the_labels_given():
    first = ENTRIES[0]
    by_id = {ex.id: ex for ex in examples({f"general/{first.title}": MEMORY})}
    assert by_id[f"general/{first.title}"].kind == MEMORY
    assert by_id[f"general/{ENTRIES[1].title}"].kind == LOOKUP
    assert by_id[f"general/{first.title}"].hops == (first.title,)


def test_splits_hold_out_every_fifth_entry():
    train, heldout = entries("train"), entries("heldout")
    assert len(train) + len(heldout) == len(ENTRIES) and not set(train) & set(heldout)
    assert heldout[:2] == [ENTRIES[4], ENTRIES[9]]
    assert [ex.id for ex in examples(split="heldout")] == [f"general/{e.title}" for e in heldout]
    with pytest.raises(ValueError, match="split='test'"):
        entries("test")


def test_kinds_come_from_the_greedy_closed_book_replies(tmp_path):
    path = tmp_path / "memory.json"
    path.write_text(json.dumps({"results": {
        "general/Faust": {"greedy_correct": True, "greedy_reply": "Goethe wrote it."},
        "general/Dracula": {"greedy_correct": False, "greedy_reply": "Mary Shelley."},
        "capital/KE": {"greedy_correct": True}}}))
    assert kinds_from_memory(path) == {"general/Faust": MEMORY, "general/Dracula": LOOKUP}


def test_the_cli_writes_a_question_file_with_the_measured_kinds(tmp_path):
    memory = tmp_path / "memory.json"
    memory.write_text(json.dumps({"results": {"general/Frankenstein": {"greedy_correct": True}}}))
    main(["--out", str(tmp_path / "q.jsonl"), "--split", "train", "--memory", str(memory)])
    rows = read_questions(tmp_path / "q.jsonl")
    assert len(rows) == len(entries("train"))
    assert [r.id for r in rows if r.kind == MEMORY] == ["general/Frankenstein"]
