"""The closed-book judge of experiments.measure_memory (which decides MEMORY vs LOOKUP)."""
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
