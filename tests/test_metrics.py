"""grpo/metrics.py: every formula of its table against numbers worked out by hand."""
from __future__ import annotations

import pytest
import torch

from data.types import LOOKUP, MEMORY, QAExample
from grpo.losses import GRPOLossOutput
from grpo.evaluation import error_class, eval_metrics, eval_rows
from grpo.metrics import rates, step_metrics, step_sums, sums_by_kind, tool_metrics
from tests.fakes import fake_rollout

# 2 questions (memory, lookup), G = 2: right without a call; right with 1 call; wrong with 2 calls;
# an unclosed call (no answer). Correctness is what compute_rewards judged (tests/test_rewards.py).
TEXTS = ["<answer>Paris</answer>",
         "<call>France capital</call><obs>Paris is the capital</obs><answer>the Paris</answer>",
         "<call>X</call><obs>41 people</obs><call>X census</call><obs>?</obs><answer>41</answer>",
         "<call>X popul"]
CALLS, INCOMPLETE, TOKENS = [0, 1, 2, 0], [0, 0, 0, 1], [5, 10, 20, 8]
CORRECT = torch.tensor([True, True, False, False])
REWARDS = torch.tensor([1.2, 1.15, -0.5, -1.2])
KINDS = [MEMORY, MEMORY, LOOKUP, LOOKUP]


def rollout(n=4):
    return fake_rollout(TEXTS[:n], CALLS[:n], no_obs=INCOMPLETE[:n], incomplete=INCOMPLETE[:n], tokens=TOKENS[:n],
                        G=2)


def test_tool_metrics_by_hand():
    m = tool_metrics(step_sums(rollout(), KINDS, CORRECT, REWARDS))
    expected = {
        "tools/search_rate": 2 / 4, "tools/incomplete_per_sample": 1 / 4,
        "tools/productivity": 2 / 3,                 # 2 right answers / 3 executed calls
        "tools/memory/calls_per_sample": 0.5, "tools/memory/search_rate": 0.5, "tools/memory/productivity": 2.0,
        "rollout/memory/tokens_per_sample": 7.5, "reward/memory/mean": 1.175,
        "tools/lookup/calls_per_sample": 1.0, "tools/lookup/search_rate": 0.5, "tools/lookup/productivity": 0.0,
        "rollout/lookup/tokens_per_sample": 14.0, "reward/lookup/mean": -0.85,
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k


def test_undefined_ratios_are_not_logged():
    """No call in the step: no productivity; a kind absent from the batch: no tags of that kind."""
    ro = fake_rollout(TEXTS[:2], [0, 0], tokens=[5, 10], G=2)
    m = tool_metrics(step_sums(ro, KINDS[:2], CORRECT[:2]), with_reward=False)
    assert m["tools/search_rate"] == 0.0 and "tools/memory/calls_per_sample" in m
    assert not [k for k in m if "productivity" in k or "lookup" in k or k.startswith("reward/")]
    with pytest.raises(ValueError, match="rollout has 4 completions, but 2 kinds"):
        step_sums(rollout(), KINDS[:2], CORRECT)


def test_sums_and_rates_by_hand():
    sums = sums_by_kind([MEMORY, LOOKUP, LOOKUP], {"correct": [1, 1, 0], "calls": [0, 2, 1], "tokens": [10, 30, 20]})
    assert sums["all"]["samples"] == 3 and sums[LOOKUP]["calls"] == 3 and sums[MEMORY]["reward"] == 0.0
    r = rates(sums["all"])
    assert r["em"] == pytest.approx(2 / 3) and r["calls_per_sample"] == 1.0 and r["tokens_per_sample"] == 20.0
    assert r["productivity"] == pytest.approx(2 / 3) and r["cost_of_pass"] == 30.0   # 3 calls, 60 tokens, 2 right
    assert "productivity" not in rates(sums[MEMORY])                                    # no call
    assert "cost_of_pass" not in rates(sums_by_kind([LOOKUP], {"tokens": [5]})["all"])  # nothing correct


def test_step_metrics_by_hand():
    """Means over the N = 4 samples; token means scaled by token_scale (here 2)."""
    out = GRPOLossOutput(loss=torch.tensor(0.5), policy_loss=torch.tensor(0.25), kl=torch.tensor(0.1),
                         clip_frac=torch.tensor(0.0), ratio_mean=torch.tensor(1.0))
    ro = rollout()
    ro.truncated = torch.tensor([False, False, False, True])
    m = step_metrics(ro, REWARDS, {"correct": torch.tensor([1.0, 1.0, -0.5, -0.5])},
                     torch.tensor([False, True]), out, token_scale=2.0)
    assert m["loss/policy"] == 0.5 and m["loss/kl"] == pytest.approx(0.2) and m["loss/total"] == 1.0
    assert m["reward/mean"] == pytest.approx(0.1625) and m["reward/correct"] == pytest.approx(0.25)
    assert m["reward/frac_zero_std"] == 0.5 and m["tools/calls_per_sample"] == 0.75
    assert m["tools/no_obs_per_sample"] == 0.25 and m["rollout/tokens_per_sample"] == pytest.approx(43 / 4)
    assert m["rollout/truncated_frac"] == 0.25


def test_step_token_means_average_over_ranks_to_the_global_token_mean():
    """Two ranks, 1 and 3 sampled tokens: rank 0 clipped with ρ = 2, rank 1 unclipped with ρ = 1. Global
    token means: clip_frac 1/4, ratio_mean (2 + 1 + 1 + 1)/4 = 1.25. Token shares M_r·W/M: 1·2/4 = 0.5 and
    3·2/4 = 1.5; the mean over ranks of the logged values (what sync_dist gives) is the global mean,
    not the mean of the ranks' means (1/2 and 1.5). With per-sequence means the loss terms keep
    token_scale 1 while the token means are still scaled by their share."""
    logged = []
    for clip, ratio, share in ((1.0, 2.0, 0.5), (0.0, 1.0, 1.5)):
        out = GRPOLossOutput(loss=torch.tensor(0.5), policy_loss=torch.tensor(0.25), kl=torch.tensor(0.1),
                             clip_frac=torch.tensor(clip), ratio_mean=torch.tensor(ratio))
        logged.append(step_metrics(rollout(), REWARDS, {}, torch.tensor([False, False]), out,
                                   token_scale=1.0, token_share=share))
    assert (logged[0]["loss/clip_frac"] + logged[1]["loss/clip_frac"]) / 2 == pytest.approx(0.25)
    assert (logged[0]["loss/ratio_mean"] + logged[1]["loss/ratio_mean"]) / 2 == pytest.approx(1.25)
    assert logged[0]["loss/policy"] == 0.25 and logged[1]["loss/kl"] == pytest.approx(0.1)


def test_eval_metrics_by_hand():
    """3 questions: memory right without a call (10 tokens), lookup right with 2 calls (30),
    lookup wrong with 1 call (20)."""
    rows = [dict(kind="memory", em=1.0, f1=1.0, well_formed=1.0, calls=0.0, tokens=10.0),
            dict(kind="lookup", em=1.0, f1=1.0, well_formed=1.0, calls=2.0, tokens=30.0),
            dict(kind="lookup", em=0.0, f1=0.5, well_formed=0.0, calls=1.0, tokens=20.0)]
    for r, misread in zip(rows, (0.0, 0.0, 1.0)):           # the wrong lookup had the gold in its observation
        r |= dict(wrong_direct=0.0, misread=misread)
    m = eval_metrics(rows)
    assert m["eval/em"] == pytest.approx(2 / 3) and m["eval/f1"] == pytest.approx(2.5 / 3)
    assert m["eval/search_rate"] == pytest.approx(2 / 3) and m["eval/calls_per_sample"] == pytest.approx(1.0)
    assert m["eval/productivity"] == pytest.approx(2 / 3)      # 2 correct / 3 calls
    assert m["eval/cost_of_pass"] == pytest.approx(60 / 2)     # 60 tokens / 2 correct
    assert m["eval/lookup/em"] == pytest.approx(0.5) and m["eval/memory/search_rate"] == 0.0
    assert "eval/memory/productivity" not in m                  # no call: undefined, not 0
    assert m["eval/misread_rate"] == pytest.approx(1 / 3) and m["eval/lookup/misread_rate"] == 0.5
    assert m["eval/wrong_direct_rate"] == 0.0
    assert not [k for k in m if "incomplete" in k or "reward" in k]


def test_eval_rows_score_each_question_against_its_own_gold():
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind=MEMORY),
             QAExample(id="es", question="Capital of Spain?", answers=("Madrid",), kind=LOOKUP)]
    texts = ["<answer>Paris</answer>", "<call>x</call><obs>o</obs><answer>Madrid city"]   # 2nd: unclosed answer
    rows = eval_rows(batch, fake_rollout(texts, [0, 1], tokens=[4, 9]))
    assert [(r["id"], r["kind"], r["em"], r["calls"], r["tokens"]) for r in rows] == [
        ("fr", MEMORY, 1.0, 0.0, 4.0), ("es", LOOKUP, 0.0, 1.0, 9.0)]
    assert rows[0]["well_formed"] == 1.0 and rows[1]["well_formed"] == 0.0 and 0 < rows[1]["f1"] < 1
    assert (rows[1]["wrong_direct"], rows[1]["misread"]) == (0.0, 0.0)   # searched; "o" does not hold Madrid


@pytest.mark.parametrize("text, em, calls, expected", [
    ("<thought>Riga.</thought><answer>Riga</answer>", 1.0, 0, (0.0, 0.0)),               # right
    ("<thought>It is in South America, I know. </thought><answer>Asia</answer>", 0.0, 0, (1.0, 0.0)),  # gold in its thought only
    ("<call>Latvia</call><obs>[Latvia] Its capital is Riga.</obs><answer>Liga</answer>", 0.0, 1, (0.0, 1.0)),
    ("<call>Latvia</call><obs>No results for 'Latvia'.</obs><call>Riga</call><obs>[Latvia] Capital: Riga.</obs>"
     "<answer>Liga</answer>", 0.0, 2, (0.0, 1.0)),                                      # the gold in the 2nd observation
    ("<thought>Riga?</thought><call>Lat</call><obs>No results for 'Lat'.</obs><answer>Liga</answer>", 0.0, 1,
     (0.0, 0.0)),                                                                        # searched, nothing found
    ("<call>Latvia</call><obs>[Latvia] Its capital is Riga.</obs><answer>Riga</answer>", 1.0, 1, (0.0, 0.0)),
])
def test_error_class_by_hand(text, em, calls, expected):
    """wrong_direct: wrong with no call; misread: wrong with a gold inside an observation (not a thought)."""
    c = error_class(text, em, calls, ("Riga", "South America"))
    assert (c["wrong_direct"], c["misread"]) == expected


def test_eval_rows_error_classes_sum_per_kind():
    """A wrong direct memory answer and a misread lookup: one of each, per kind and overall."""
    batch = [QAExample(id="sr", question="Continent of Suriname?", answers=("South America",), kind=MEMORY),
             QAExample(id="lv", question="Capital of Latvia?", answers=("Riga",), kind=LOOKUP)]
    texts = ["<thought>Suriname is in South America.</thought><answer>Asia</answer>",
             "<call>Latvia</call><obs>[Latvia] Its capital is Riga.</obs><answer>Liga</answer>"]
    m = eval_metrics(eval_rows(batch, fake_rollout(texts, [0, 1], tokens=[9, 12])))
    assert m["eval/wrong_direct_rate"] == 0.5 and m["eval/misread_rate"] == 0.5
    assert (m["eval/memory/wrong_direct_rate"], m["eval/memory/misread_rate"]) == (1.0, 0.0)
    assert (m["eval/lookup/wrong_direct_rate"], m["eval/lookup/misread_rate"]) == (0.0, 1.0)
