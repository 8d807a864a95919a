"""The demo's last phase: two policies side by side on the same questions (grpo/demo.py)."""
from __future__ import annotations

import torch

from data.types import LOOKUP, MEMORY, QAExample
from grpo import demo
from models.loading import add_lora, load_model_and_tokenizer


def test_side_by_side_shows_each_policy_on_each_question(tmp_path):
    folders = {}
    for label, seed in (("cold start", 1), ("GRPO", 2)):
        torch.manual_seed(seed)
        model = add_lora(load_model_and_tokenizer("tiny")[0], r=2, alpha=4)
        model.save_pretrained(tmp_path / label.replace(" ", "_"))
        folders[label] = tmp_path / label.replace(" ", "_")
    examples = [QAExample("capital/KE", "What is the capital of Kenya?", ("Nairobi",), MEMORY, "capital", ("Kenya",)),
                QAExample("population/KE", "How many people live in Kenya?", ("1",), LOOKUP, "population", ("Kenya",))]
    text = demo.side_by_side(folders, examples, lambda q: "[Kenya] Nairobi.", model_name="tiny").splitlines()
    assert len(text) == 2 * 3  # a question line, then one line per policy
    assert text[0].startswith("What is the capital of Kenya?  [memory; gold Nairobi]")
    assert text[1].lstrip().startswith("cold start") and text[2].lstrip().startswith("GRPO")
    assert all(line.rstrip().endswith(("right", "wrong")) for line in text[1:3] + text[4:6])


def test_nothing_published_skips_the_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "PUBLISHED", tmp_path / "none")
    demo.show_what_grpo_learned()
    assert "skipped" in capsys.readouterr().out
