"""Question files and balanced sets (data/questions.py), and evaluating a checkpoint on a question
file through `python -m grpo validate ... --data.val_path` (eval.json / eval.md)."""
from __future__ import annotations

import json

import pytest

from data.questions import balanced, balanced_within_types, read_questions, write_questions
from data.types import LOOKUP, MEMORY, QAExample


def q(i, kind, type_):
    return QAExample(id=f"{type_}/{i}", question=f"Question {i}?", answers=(f"a{i}",), kind=kind, type=type_)


def test_read_questions_accepts_answer_or_answers_and_names_bad_lines(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "Capital of Kenya?", "answer": "Nairobi", "kind": "memory"}\n\n'
                 '{"id": "x", "question": "Population of Peru?", "answers": ["33 million", "33M"]}\n')
    a, b = read_questions(f)
    assert (a.id, a.answers, a.kind) == (f"{f}, line 1", ("Nairobi",), MEMORY)
    assert (b.id, b.answers, b.kind) == ("x", ("33 million", "33M"), LOOKUP)  # no kind: lookup
    f.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q?"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl, line 2: expected \"answers\""):
        read_questions(f)
    f.write_text('{"question": "Q?", "answer": "A", "kind": "trivia"}\n')
    with pytest.raises(ValueError, match=r"line 1: kind='trivia'"):
        read_questions(f)
    f.write_text('not json\n')
    with pytest.raises(ValueError, match=r"q\.jsonl, line 1: invalid JSON"):
        read_questions(f)


def test_balanced_takes_all_of_the_rarer_kind_and_stratifies_the_other():
    """3 memory (2 capital, 1 continent) and 12 lookup (6 population, 3 area, 3 currency): 3 of each kind;
    lookup quotas 3·(6, 3, 3)/12 = (1.5, 0.75, 0.75) -> floors (1, 0, 0), remainders to the largest
    fractions: population 0.5 < area/currency 0.75, so area and currency get one each: (1, 1, 1)."""
    memory = [q(0, MEMORY, "capital"), q(1, MEMORY, "capital"), q(2, MEMORY, "continent")]
    lookup = ([q(i, LOOKUP, "population") for i in range(6)] + [q(i, LOOKUP, "area") for i in range(3)]
              + [q(i, LOOKUP, "currency") for i in range(3)])
    out = balanced(memory + lookup, seed=0)
    assert sorted(ex.id for ex in out if ex.kind == MEMORY) == sorted(ex.id for ex in memory)
    picked = [ex.type for ex in out if ex.kind == LOOKUP]
    assert sorted(picked) == ["area", "currency", "population"]
    assert balanced(list(reversed(memory + lookup)), seed=0) == out  # order of the input does not matter
    with pytest.raises(ValueError, match="0 memory and 12 lookup"):
        balanced(lookup)


def test_balanced_within_types_pairs_known_and_unknown_of_each_type():
    """capital: 3 memory, 5 lookup -> 3 + 3; continent: 4 memory, 1 lookup -> 1 + 1; area (lookup only,
    4 of them) -> per_lookup_type = 2; currency (1 of them) -> all 1. 3 + 3 + 1 + 1 + 2 + 1 = 11."""
    pool = ([q(i, MEMORY, "capital") for i in range(3)] + [q(10 + i, LOOKUP, "capital") for i in range(5)]
            + [q(i, MEMORY, "continent") for i in range(4)] + [q(10, LOOKUP, "continent")]
            + [q(i, LOOKUP, "area") for i in range(4)] + [q(0, LOOKUP, "currency")])
    out = balanced_within_types(pool, per_lookup_type=2, seed=0)
    counts = {}
    for ex in out:
        counts[(ex.type, ex.kind)] = counts.get((ex.type, ex.kind), 0) + 1
    assert counts == {("capital", MEMORY): 3, ("capital", LOOKUP): 3, ("continent", MEMORY): 1,
                      ("continent", LOOKUP): 1, ("area", LOOKUP): 2, ("currency", LOOKUP): 1}
    assert {ex.id for ex in out if ex.type == "capital" and ex.kind == MEMORY} == {"capital/0", "capital/1", "capital/2"}
    assert "continent/10" in {ex.id for ex in out}  # the rarer kind is taken whole
    assert len({ex.id for ex in out}) == len(out)
    assert balanced_within_types(list(reversed(pool)), 2, seed=0) == out  # input order does not matter
    assert balanced_within_types(pool, 2, seed=1) != out  # the draw follows the seed
    with pytest.raises(ValueError, match="no memory questions"):
        balanced_within_types([q(0, LOOKUP, "area")], 2)
    with pytest.raises(ValueError, match="per_lookup_type=-1"):
        balanced_within_types(pool, -1)


@pytest.mark.parametrize("committed, options", [("train_balanced.jsonl", []),
                                                 ("train_within_types.jsonl", ["--within-types", "12"])])
def test_committed_training_prompts_are_what_their_command_writes(tmp_path, committed, options):
    """results/questions/ holds the training prompts of the economy runs; the README's command must
    rebuild them byte for byte (the offline task is embedded, so this needs no data)."""
    from pathlib import Path

    from data.questions import main

    main(["--split", "train", "--out", str(tmp_path / committed), *options])
    root = Path(__file__).resolve().parents[1]
    assert (tmp_path / committed).read_bytes() == (root / "results/questions" / committed).read_bytes()


def test_validate_on_a_question_file_writes_eval_files(tmp_path):
    """Any checkpoint (here the tiny config's fresh policy) on any question file: eval.json holds one row
    per question and the metrics per kind; eval.md a row for all questions and one per kind."""
    from grpo.cli import main

    questions = [q(0, MEMORY, "capital"), q(1, LOOKUP, "population"), q(2, LOOKUP, "area")]
    write_questions(questions, tmp_path / "q.jsonl")
    report = tmp_path / "report"
    main(["validate", "-c", "configs/tiny.yaml", "--data.val_path", str(tmp_path / "q.jsonl"),
          "--trainer.limit_val_batches", "null", "--data.val_limit", "null", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path), "--model.max_new_tokens", "6",
          "--trainer.callbacks", "callbacks.report.EvalReport", "--trainer.callbacks.output_dir", str(report)])
    record = json.loads((report / "eval.json").read_text())
    assert [r["id"] for r in record["rows"]] == [ex.id for ex in questions]
    assert record["num_questions"] == {"all": 3, "lookup": 2, "memory": 1}
    m = record["metrics"]
    assert m["eval/calls_per_sample"] == pytest.approx(sum(r["calls"] for r in record["rows"]) / 3)
    assert m["eval/lookup/tokens_per_sample"] == pytest.approx(
        sum(r["tokens"] for r in record["rows"] if r["kind"] == "lookup") / 2)
    table = (report / "eval.md").read_text()
    assert "| all | 3 |" in table and "| lookup | 2 |" in table and "| memory | 1 |" in table
