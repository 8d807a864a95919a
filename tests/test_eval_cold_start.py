"""Tests of the per-kind cold-start evaluation (experiments/eval_cold_start.py): scoring, grouping, the CLI."""
from __future__ import annotations

import json
import warnings

import pytest

from data.offline_task import build_offline_task
from data.types import LOOKUP, MEMORY, QAExample
from experiments.eval_cold_start import UNKNOWN_MEMORY, base_closed_book, main, score, select_questions, table


@pytest.fixture(scope="module")
def task():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_offline_task(0)


def ex(kind, type_, answer="Athens"):
    return QAExample(f"{type_}/XX", "Q?", (answer,), kind, type_, hops=("Greece",))


def test_score_counts_direct_and_searched_answers_apart():
    direct = score(ex(MEMORY, "capital"), "<thought>The capital of Greece is Athens.</thought><answer>Athens</answer>", 0)
    searched = score(ex(MEMORY, "capital"), "<call>Greece</call><obs>x</obs><answer>Athens</answer>", 1)
    wrong = score(ex(MEMORY, "capital"), "<thought>x</thought><answer>Macedonia</answer>", 0)
    malformed = score(ex(MEMORY, "capital"), "The capital of Greece is Athens.", 0)
    assert (direct["em"], direct["direct_em"], direct["search_rate"], direct["well_formed"]) == (1, 1, 0, 1)
    assert (searched["em"], searched["direct_em"], searched["search_rate"]) == (1, 0, 1)
    assert (wrong["em"], wrong["direct_em"], wrong["well_formed"]) == (0, 0, 1)
    assert (malformed["em"], malformed["well_formed"]) == (0, 0)


def test_table_means_per_kind_and_the_unknown_capitals_subset():
    rows = [score(ex(MEMORY, "capital"), "<answer>Athens</answer>", 0),
            score(ex(MEMORY, "continent"), "<answer>Asia</answer>", 0),
            score(ex(LOOKUP, "capital"), "<call>Greece</call><obs>x</obs><answer>Athens</answer>", 1),
            score(ex(LOOKUP, "population"), "<answer>12</answer>", 0)]
    out = table({"greedy": rows})
    assert out["greedy/memory"] == {"n": 2, "em": 0.5, "direct_em": 0.5, "well_formed": 1.0, "search_rate": 0.0,
                                    "direct_acc": 0.5}
    assert out["greedy/lookup"]["n"] == 2 and out["greedy/lookup"]["search_rate"] == 0.5
    assert out[f"greedy/{UNKNOWN_MEMORY}"] == {"n": 1, "em": 1.0, "direct_em": 0.0, "well_formed": 1.0,
                                               "search_rate": 1.0, "direct_acc": None}
    # direct_acc: EM among the completions that did not search (1 right of 3), not over all 4
    rows = [score(ex(MEMORY, "capital"), t, c) for t, c in [("<answer>Athens</answer>", 0), ("<answer>Rome</answer>", 0),
            ("<answer>Oslo</answer>", 0), ("<call>G</call><obs>x</obs><answer>Athens</answer>", 1)]]
    assert table({"sampled": rows})["sampled/memory"]["direct_acc"] == pytest.approx(1 / 3)


def test_heldout_is_validation_plus_test_memory_first(task):
    qs = select_questions(task, "heldout", None, 5)
    n_mem = sum(e.kind == MEMORY for e in task.validation + task.test)
    assert [e.kind for e in qs] == [MEMORY] * n_mem + [LOOKUP] * 5
    assert {e.id for e in qs} <= {e.id for e in task.validation + task.test}
    assert not {e.id for e in qs} & {e.id for e in task.train}
    with pytest.raises(ValueError, match="--split"):
        select_questions(task, "train", None, None)


def test_base_closed_book_reads_the_measurement(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": "m", "results": {
        "capital/GR": {"greedy_correct": True, "sampled_accuracy": 0.5, "greedy_reply": "Athens."},
        "capital/BG": {"greedy_correct": False, "sampled_accuracy": 0.0, "greedy_reply": "Buke."}}}))
    assert base_closed_book(["capital/GR", "capital/BG", "capital/XX"], path) == \
        {"n": 2, "greedy": 0.5, "sampled": 0.25}


def test_command_line_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(["--adapter", "none", "--model", "tiny", "--split", "test", "--memory-limit", "2", "--lookup-limit", "3",
          "--max-new-tokens", "4", "--batch", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "greedy/memory" in printed and "sampled/lookup" in printed and "knowledge ratio" in printed
    result = json.loads(out.read_text())
    assert result["results"]["greedy/memory"]["n"] == 2 and len(result["rows"]["sampled"]) == 5
    main(["--adapter", "none", "--model", "tiny", "--split", "test", "--memory-limit", "2", "--lookup-limit", "1",
          "--max-new-tokens", "4", "--modes", "sampled", "--samples", "3", "--temperature", "0.7", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]["sampled"]
    assert result["temperature"] == 0.7 and len(rows) == 9 and [r["id"] for r in rows[:3]] == [rows[0]["id"]] * 3
    with pytest.raises(SystemExit):
        main(["--adapter", "none", "--model", "tiny", "--samples", "0"])
