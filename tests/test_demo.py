"""The demo's last phase: two policies side by side on the same questions (grpo/demo.py)."""
from __future__ import annotations

import torch

from data.types import LOOKUP, MEMORY, QAExample
from grpo import demo
from grpo.infer import InferenceResult
from models.loading import add_lora, load_model_and_tokenizer


KENYA = QAExample("capital/KE", "What is the capital of Kenya?", ("Nairobi",), MEMORY, "capital", ("Kenya",))
POPULATION = QAExample("population/KE", "How many people live in Kenya?", ("1",), LOOKUP, "population", ("Kenya",))


def _result(answer, queries=()):
    return InferenceResult(answer=answer, text="", calls=len(queries), queries=list(queries), tokens=5,
                           stop_reason="answer", unclosed_call=False, context_tokens=50)


def test_run_policies_answers_every_question_with_every_adapter(tmp_path):
    folders = {}
    for label, seed in (("cold start", 1), ("GRPO", 2)):
        torch.manual_seed(seed)
        model = add_lora(load_model_and_tokenizer("tiny")[0], r=2, alpha=4)
        model.save_pretrained(tmp_path / label.replace(" ", "_"))
        folders[label] = tmp_path / label.replace(" ", "_")
    results = demo.run_policies(folders, [KENYA, POPULATION], lambda q: "[Kenya] Nairobi.", model_name="tiny")
    assert list(results) == ["cold start", "GRPO"]
    assert all(len(rows) == 2 and all(isinstance(r, InferenceResult) for r in rows) for rows in results.values())


def test_totals_count_right_answers_calls_and_searches_per_kind():
    examples = [KENYA, KENYA, POPULATION, POPULATION]
    results = {"a": [_result("Nairobi"), _result("Mombasa", ["Kenya"]), _result("1", ["Kenya", "Kenya"]), _result("2")]}
    # EM 2/4; calls (0 + 1 + 2 + 0) / 4; memory: 1 of 2 searched; lookup: 1 of 2
    assert demo.totals(results, examples) == ("  a  EM 0.500  calls / q 0.75  memory searched 0.50 (2 q)  "
                                              "lookup searched 0.50 (2 q)")


def test_side_by_side_shows_each_policy_on_each_question_or_only_where_they_differ():
    examples = [KENYA, POPULATION]
    results = {"cold start": [_result("Nairobi", ["Kenya"]), _result("1", ["Kenya"])],
               "GRPO": [_result("Nairobi"), _result("1", ["Kenya"])]}
    text = demo.side_by_side(results, examples).splitlines()
    assert len(text) == 2 * 3  # a question line, then one line per policy
    assert text[0] == "What is the capital of Kenya?  [memory; gold Nairobi]"
    assert text[1].split() == ["cold", "start", "searched", "Kenya", "->", "Nairobi", "right"]
    assert text[2].split() == ["GRPO", "answered", "directly", "->", "Nairobi", "right"]
    assert text[5].split() == ["GRPO", "searched", "Kenya", "->", "1", "right"]
    # the population question is searched and right under both: not a difference
    assert demo.side_by_side(results, examples, only_different=True).splitlines() == text[:3]
    results["GRPO"][1] = _result("2", ["Kenya"])  # same search, now wrong: a difference
    assert len(demo.side_by_side(results, examples, only_different=True).splitlines()) == 6


def test_nothing_published_skips_the_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "PUBLISHED", tmp_path / "none")
    demo.show_what_grpo_learned()
    assert "skipped" in capsys.readouterr().out
