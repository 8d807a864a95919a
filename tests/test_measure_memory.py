"""The closed-book judge of experiments.measure_memory (which decides MEMORY vs LOOKUP)."""
import pytest

from data.answers import contains_gold
from experiments.measure_memory import report


def test_gold_found_as_whole_words_after_normalization():
    assert contains_gold("The capital of Afghanistan is Kabul.<|im_end|>", ["Kabul"])  # EOS glued to the text
    assert contains_gold("It is in AFRICA!", ["Africa"])
    assert contains_gold("Washington, D.C.", ["Washington"])
    assert not contains_gold("The capital is Kabulistan.", ["Kabul"])
    assert not contains_gold("I don't know.", ["Kabul", ""])


def test_report_counts_per_kind():
    results = {"capital/A": {"greedy_correct": True, "sampled_accuracy": 0.5},
               "capital/B": {"greedy_correct": False, "sampled_accuracy": 0.0},
               "continent/A": {"greedy_correct": True, "sampled_accuracy": 1.0}}
    text = report(results)
    assert "capital    greedy 1/2 (50%), sampled accuracy 25%" in text
    assert "continent  greedy 1/1 (100%), sampled accuracy 100%" in text


def test_a_question_file_is_labelled_by_the_greedy_measurement(tmp_path):
    from data.questions import read_questions, write_questions
    from data.types import LOOKUP, MEMORY, QAExample
    from experiments.measure_memory import labelled, main

    qs = [QAExample("probe/0", "Who wrote Hamlet?", ("Shakespeare",), LOOKUP, type="general"),
          QAExample("probe/1", "Symbol of tungsten?", ("W",), MEMORY, type="general")]
    results = {"probe/0": {"greedy_correct": True}, "probe/1": {"greedy_correct": False}}
    assert [q.kind for q in labelled(qs, results)] == [MEMORY, LOOKUP]  # the measurement decides, not the file
    assert [q.question for q in labelled(qs, results)] == [q.question for q in qs]
    path = tmp_path / "q.jsonl"
    write_questions(qs, path)
    main(["--model", "tiny", "--samples", "1", "--questions", str(path), "--out", str(tmp_path / "m.json"),
          "--label-out", str(tmp_path / "l.jsonl")])
    assert [q.id for q in read_questions(tmp_path / "l.jsonl")] == ["probe/0", "probe/1"]
    with pytest.raises(SystemExit):  # would overwrite the offline task's measurement
        main(["--model", "tiny", "--questions", str(path)])
