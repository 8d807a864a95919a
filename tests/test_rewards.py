"""Rewards: hand-computed values for every VOI row, OTC; property tests (of the parser too): finite and
bounded for any text, linear time on megabytes of malformed output."""
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.protocol import BUDGET_OBSERVATION, parse_completion
from grpo.rewards import (OTCWeights, VOIWeights, answer_grounded, check_finite_rewards, judge, otc_group_rewards,
                          otc_optimal_calls, otc_tool_factor, voi_reward, voi_reward_bounds)
from tests.fakes import KENYA

TWO_CALLS = ("<call>Kenya</call><obs>[Kenya] ...</obs><call>Kenya population</call>"
             "<obs>[Kenya] 53 million</obs><answer>53 million</answer>")

# --------------------------------------------------------------------------------------- VOI


def _voi(text, calls, no_obs, golds=("53 million",)):
    return voi_reward(*judge(text, list(golds)), calls, no_obs)


def _otc(texts, golds, num_calls, weights=OTCWeights()):
    """OTC rewards of a group of completion texts (each judged against `golds`)."""
    correct, well_formed = zip(*(judge(t, golds) for t in texts))
    return otc_group_rewards(correct, well_formed, num_calls, weights)


def test_judge_reads_correctness_and_format():
    assert judge(KENYA, ["53 million"]) == (True, True)
    assert judge("<answer>the 53 Million.</answer>", ["53 million"]) == (True, True)  # HotpotQA normalisation
    assert judge("<answer>12 million</answer>", ["53 million"]) == (False, True)
    assert judge("53 million", ["53 million"]) == (False, False)                      # no answer: not correct
    assert judge("<call>Kenya<answer>53 million</answer>", ["53 million"]) == (True, False)


@pytest.mark.parametrize("text, calls, no_obs, expected", [
    # correct, direct: correct 1.0 + format 0.1 + tools 0 + no-obs 0 + bonus 0.1 = 1.2
    ("<answer>53 million</answer>", 0, 0, dict(correct=1.0, format=0.1, tool_cost=0.0,
                                               no_obs_penalty=0.0, direct_bonus=0.1, total=1.2)),
    # correct with 2 calls: 1.0 + 0.1 - 2*0.05 + 0 + 0 = 1.0
    (TWO_CALLS, 2, 0, dict(correct=1.0, format=0.1, tool_cost=-0.1, no_obs_penalty=0.0,
                           direct_bonus=0.0, total=1.0)),
    # wrong, direct: -0.5 + 0.1 = -0.4
    ("<answer>12 million</answer>", 0, 0, dict(correct=-0.5, format=0.1, direct_bonus=0.0, total=-0.4)),
    # wrong after 1 call: -0.5 + 0.1 - 0.05 = -0.45
    (KENYA.replace("53", "12"), 1, 0, dict(correct=-0.5, tool_cost=-0.05, total=-0.45)),
    # no answer at all (malformed): -0.5 - 0.5 = -1.0
    ("53 million", 0, 0, dict(correct=-0.5, format=-0.5, direct_bonus=0.0, total=-1.0)),
    # unclosed call, the env counts it as a call without observation: -0.5 - 0.5 - 0.2 = -1.2
    ("<call>Kenya", 0, 1, dict(correct=-0.5, format=-0.5, no_obs_penalty=-0.2, total=-1.2)),
    # unclosed call then a correct answer: 1.0 - 0.5 + 0 - 0.2, no direct bonus (a call was
    # attempted) = 0.3
    ("<call>Kenya<answer>53 million</answer>", 0, 1, dict(direct_bonus=0.0, total=0.3)),
    # over budget (max 2): 2 executed + 1 refused, which the rollout answers with the budget
    # observation, so the text stays well-formed: 1.0 + 0.1 - 2*0.05 - 0.2 = 0.8
    (TWO_CALLS.replace("<answer>", f"<call>more</call><obs>{BUDGET_OBSERVATION}</obs><answer>"), 2, 1,
     dict(correct=1.0, format=0.1, tool_cost=-0.1, no_obs_penalty=-0.2, direct_bonus=0.0, total=0.8)),
])
def test_voi_table(text, calls, no_obs, expected):
    r = _voi(text, calls, no_obs)
    assert set(r) == {"correct", "format", "tool_cost", "no_obs_penalty", "direct_bonus", "guess_penalty",
                      "ungrounded_penalty", "total"}
    assert r["guess_penalty"] == r["ungrounded_penalty"] == 0.0                      # off by default
    for key, value in expected.items():
        assert r[key] == pytest.approx(value), key
    assert r["total"] == pytest.approx(sum(v for k, v in r.items() if k != "total"))


def test_voi_guess_penalty_charges_only_wrong_answers_without_a_call():
    w = VOIWeights(direct_bonus=1.0, wrong_direct=-1.0)
    # a wrong guess: -0.5 + 0.1 - 1.0 = -1.4; a wrong answer after a search pays no guess penalty:
    # -0.5 + 0.1 - 0.05 = -0.45; nor after a call that got no observation: -0.5 + 0.1 - 0.2 = -0.6
    assert voi_reward(False, True, 0, 0, w)["total"] == pytest.approx(-1.4)
    assert voi_reward(False, True, 1, 0, w)["total"] == pytest.approx(-0.45)
    assert voi_reward(False, True, 0, 1, w)["total"] == pytest.approx(-0.6)
    # a right direct answer: 1.0 + 0.1 + 1.0 = 2.1, no penalty
    assert voi_reward(True, True, 0, 0, w) == dict(correct=1.0, format=0.1, tool_cost=0.0, no_obs_penalty=0.0,
                                                   direct_bonus=1.0, guess_penalty=0.0, ungrounded_penalty=0.0,
                                                   total=pytest.approx(2.1))
    # a 50/50 guess at a two-country comparison, against two searches right 75 % of the time:
    # 0.5 * 2.1 + 0.5 * -1.4 = 0.35 < 0.75 * 1.0 + 0.25 * -0.5 = 0.625 (without the penalty 0.85 > 0.625)
    guess = 0.5 * voi_reward(True, True, 0, 0, w)["total"] + 0.5 * voi_reward(False, True, 0, 0, w)["total"]
    search = 0.75 * voi_reward(True, True, 2, 0, w)["total"] + 0.25 * voi_reward(False, True, 2, 0, w)["total"]
    assert guess == pytest.approx(0.35) and search == pytest.approx(0.625)
    # the bound includes it: lo = -0.5 - 0.5 - 5*0.05 - 0.2 - 1.0 = -2.45; hi = 1.0 + 0.1 + 1.0 = 2.1
    assert voi_reward_bounds(w, 5, 1) == pytest.approx((-2.45, 2.1))


@pytest.mark.parametrize("text, grounded", [
    ("<thought>The capital of Kenya is Nairobi.</thought><answer>Nairobi</answer>", True),
    ("<thought>The capital of Kenya is nairobi!</thought><answer> Nairobi. </answer>", True),   # normalized
    ("<thought>Sierra Leone is in West Africa.</thought><answer>Africa</answer>", True),         # whole words
    ("<thought>I know it.</thought><thought>It is Nairobi.</thought><answer>Nairobi</answer>", True),  # any thought
    ("<thought>The capital of Kenya is Nairobi.</thought><answer>Kenya</answer>", False),      # the question's word
    ("<thought>Kenya's capital is Kenya City, in Kenya.</thought><answer>Kenya</answer>", True),  # 2 > 1 in the question
    ("<thought>I know it.</thought><answer>...</answer>", False),                              # nothing left to state
    ("<thought>Kenya is in East Africa.</thought><answer>Asia</answer>", False),                # not stated
    ("<thought>Kenya is in Africa.</thought><answer>Afr</answer>", False),                      # not whole words
    ("<thought>Nairobi?</thought><call>Kenya</call><obs>[Kenya] Nairobi</obs><answer>Nairobi</answer>", True),
    ("<call>Kenya</call><obs>[Kenya] capital Nairobi</obs><answer>Nairobi</answer>", False),  # obs is not a thought
    ("<answer>Nairobi</answer>", False),                                                        # no thought
    ("<thought>Nairobi", True),                                                                 # no answer
])
def test_answer_grounded_by_hand(text, grounded):
    assert answer_grounded(text, "What is the capital of Kenya?") is grounded


def test_answer_grounded_when_the_answer_is_a_word_of_the_question():
    """Stated means more often in the thoughts than in the question: a capital named like its country
    and a comparison's country are grounded when the thought states them beyond naming the subject."""
    djibouti = "What is the capital of Djibouti?"
    assert answer_grounded("<thought>The capital of Djibouti is Djibouti.</thought><answer>Djibouti</answer>", djibouti)
    assert not answer_grounded("<thought>Djibouti is in Africa.</thought><answer>Djibouti</answer>", djibouti)
    peru = "Which has more people, Kenya or Peru?"
    assert answer_grounded("<thought>Kenya has 54 million people, Peru 34 million, so Kenya.</thought>"
                           "<answer>Kenya</answer>", peru)
    assert not answer_grounded("<thought>Kenya and Peru are big.</thought><answer>Kenya</answer>", peru)
    assert not answer_grounded("<thought>Peru and Peru and Kenya.</thought><answer>Kenya</answer>", peru)


def test_voi_ungrounded_penalty_charges_direct_answers_their_thought_does_not_state():
    w = VOIWeights(direct_bonus=1.0, ungrounded_direct=-0.6)
    # right but not stated: 1.0 + 0.1 + 1.0 - 0.6 = 1.5; wrong and not stated: -0.5 + 0.1 - 0.6 = -1.0
    assert voi_reward(True, True, 0, 0, w, grounded=False)["total"] == pytest.approx(1.5)
    assert voi_reward(False, True, 0, 0, w, grounded=False)["total"] == pytest.approx(-1.0)
    # stated (right 2.1, wrong -0.4), or after a search (its answer comes from the observation): no penalty
    assert voi_reward(True, True, 0, 0, w, grounded=True)["total"] == pytest.approx(2.1)
    assert voi_reward(False, True, 0, 0, w, grounded=True)["total"] == pytest.approx(-0.4)
    assert voi_reward(True, True, 1, 0, w, grounded=False)["ungrounded_penalty"] == 0.0
    assert voi_reward(True, True, 0, 1, w, grounded=False)["ungrounded_penalty"] == 0.0
    assert voi_reward(True, True, 0, 0, VOIWeights(), grounded=False)["ungrounded_penalty"] == 0.0  # off by default
    # the bound: lo = -0.5 - 0.5 - 5*0.05 - 0.2 - 0.6 = -2.05; hi = 2.1
    assert voi_reward_bounds(w, 5, 1) == pytest.approx((-2.05, 2.1))


def test_voi_bounds_hand_computed():
    # lo = -0.5 - 0.5 - 5*0.05 - 1*0.2 = -1.45; hi = 1.0 + 0.1 + 0 + 0 + 0.1 = 1.2
    assert voi_reward_bounds(VOIWeights(), 5, 1) == pytest.approx((-1.45, 1.2))


def test_voi_rejects_negative_counts():
    with pytest.raises(ValueError, match="num_calls=-1"):
        voi_reward(True, True, -1, 0)

# --------------------------------------------------------------------------------------- OTC


@pytest.mark.parametrize("m, n, c, expected", [
    (0, 0, 1.0, 1.0),                            # f = n = 0
    (1, 0, 1.0, 0.5),                            # cos(pi/3)
    (2, 0, 1.0, math.cos(2 * math.pi / 5)),      # cos(2pi/5) = 0.309
    (1, 0, 6.0, math.cos(math.pi / 8)),          # larger c decays slower: 0.924
    (2, 2, 1.0, 1.0),                            # f = 2*2*2/4 = 2, sin(2pi/4) = 1
    (3, 1, 1.0, math.sqrt(0.5)),                 # f = 6/4 = 1.5, sin(1.5pi/2) = sin(3pi/4)
    (1, 2, 1.0, math.sqrt(3) / 2),               # f = 4/3, sin((4/3)pi/4) = sin(pi/3)
    (0, 1, 1.0, 0.0),                            # f = 0, sin(0)
])
def test_otc_tool_factor_values(m, n, c, expected):
    assert otc_tool_factor(m, n, c) == pytest.approx(expected)


@given(n=st.integers(0, 10), c=st.floats(0.1, 10))
def test_otc_tool_factor_peaks_at_n_and_decreases(n, c):
    values = [otc_tool_factor(m, n, c) for m in range(n, n + 20)]
    assert values[0] == pytest.approx(1.0)
    assert all(0.0 <= b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_otc_group_rewards_n_zero():
    texts = ["<answer>53 million</answer>", TWO_CALLS, KENYA.replace("53", "12"), "53 million"]
    out = _otc(texts, ["53 million"], [0, 2, 1, 0])
    assert otc_optimal_calls([True, True, False, False], [0, 2, 1, 0]) == 0
    # n = 0, default c = 6: correct direct 1*1 + 0.1; correct with 2 calls cos(2pi/(4+6)) + 0.1;
    # wrong 0 + 0.1; no answer 0 - 0.5
    totals = [1.1, math.cos(math.pi / 5) + 0.1, 0.1, -0.5]
    assert [r["total"] for r in out] == pytest.approx(totals)
    assert [r["tool_factor"] for r in out] == pytest.approx([1.0, math.cos(math.pi / 5), 1.0, 1.0])


def test_otc_group_rewards_n_one_and_alpha():
    three = KENYA.replace("<answer>", "<call>a</call><obs>o</obs><call>b</call><obs>o</obs><answer>")
    out = _otc([KENYA, three], ["53 million"], [1, 3], OTCWeights(alpha=2.0))
    # n = 1: m = 1 -> 2*1 + 0.1 = 2.1; m = 3 -> 2*sin(3pi/4) + 0.1 = 1.5142
    assert [r["total"] for r in out] == pytest.approx([2.1, 2 * math.sqrt(0.5) + 0.1])


def test_otc_group_no_correct_sample_gives_format_only():
    out = _otc(["<answer>1</answer>", "<answer>2"], ["53 million"], [3, 0])
    assert otc_optimal_calls([False, False], [3, 0]) is None
    assert [r["total"] for r in out] == pytest.approx([0.1, -0.5])
    assert all(r["tool_factor"] == 1.0 and r["correct"] == 0.0 for r in out)

# --------------------------------------------------------------------------------------- guard


def test_check_finite_rewards_names_sample_and_component():
    check_finite_rewards([{"total": 1.0}, {"total": -0.5}])
    with pytest.raises(ValueError, match=r"'format' of sample q7-3 \(index 1\)"):
        check_finite_rewards([{"total": 1.0}, {"format": math.nan}], ["q7-2", "q7-3"])
    with pytest.raises(ValueError, match="'total' of sample 0"):
        check_finite_rewards([{"total": math.inf}])

# --------------------------------------------------------------------------------------- properties

FRAGMENTS = ["<answer>", "</answer>", "<call>", "</call>", "<obs>", "</obs>", "<thought>",
             "</thought>", "< answer >", "</ Answer>", "<CALL >", "<anwser>", "<", ">", "/",
             "<|im_end|>", "<|endoftext|>", " ", "\n", "53 million", "Paris", "the", "é漢🙂", "\x00"]
tag_soup = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=40).map("".join)
any_text = st.text() | tag_soup


@settings(max_examples=400, deadline=None)
@given(text=any_text)
def test_parse_never_raises_and_is_consistent(text):
    p = parse_completion(text)
    assert p.num_calls == len(p.calls) and p.num_unclosed_calls >= 0
    assert p.well_formed == (p.reason == "")
    assert p.answer is None or p.answer == p.answer.strip() != ""
    if p.well_formed:
        assert p.answer is not None and p.num_unclosed_calls == 0


@settings(max_examples=400, deadline=None)
@given(text=any_text, golds=st.lists(st.text(max_size=12) | st.sampled_from(["53 million", "Paris"]),
                                     max_size=3),
       calls=st.integers(0, 5), no_obs=st.integers(0, 3))
def test_voi_never_raises_and_within_bounds(text, golds, calls, no_obs):
    r = voi_reward(*judge(text, golds), calls, no_obs)
    check_finite_rewards([r])
    lo, hi = voi_reward_bounds(VOIWeights(), max_tool_calls=5, max_no_obs=3)
    assert lo - 1e-9 <= r["total"] <= hi + 1e-9
    assert r["total"] == pytest.approx(sum(v for k, v in r.items() if k != "total"))


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(any_text, min_size=1, max_size=6), golds=st.lists(st.sampled_from(["Paris", "53 million"])
                                                                         | st.text(max_size=8), max_size=3),
       calls=st.data(), alpha=st.floats(0.0, 5.0), c=st.floats(0.1, 10.0))
def test_otc_rewards_are_finite_and_bounded(texts, golds, calls, alpha, c):
    """total = correct + format with 0 <= correct <= alpha and format in {malformed, well_formed};
    tool_factor in [0, 1]."""
    w = OTCWeights(alpha=alpha, c=c)
    num_calls = calls.draw(st.lists(st.integers(0, 8), min_size=len(texts), max_size=len(texts)))
    correct, well_formed = zip(*(judge(t, golds) for t in texts))
    for r in otc_group_rewards(correct, well_formed, num_calls, w):
        assert all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r["tool_factor"] <= 1.0 and -1e-12 <= r["correct"] <= alpha + 1e-12
        assert r["format"] in (w.well_formed, w.malformed)
        lo, hi = min(w.malformed, w.well_formed), alpha + max(w.malformed, w.well_formed)
        assert lo - 1e-12 <= r["total"] <= hi + 1e-12


@pytest.mark.parametrize("text", [
    "<thought><answer><call>" * 100_000,                 # nested openings, never closed
    "<call>q</call><obs>" * 60_000,                      # every observation left open
    "</answer></call></obs>" * 60_000,                   # stray closing tags only
    "<answer>x</answer>" * 60_000,                       # 60k answers
    "<call>" + "a" * 1_000_000,                          # one unclosed call, a megabyte query
    "<answer>" + "Paris " * 200_000 + "<|im_end|>" * 50_000,  # unclosed megabyte answer, end markers
], ids=["nested", "open-obs", "stray-closes", "many-answers", "long-call", "long-answer"])
def test_megabyte_malformed_outputs_are_scored_fast(text):
    """parse_completion, judge (EM of a megabyte answer) and both rewards stay linear on megabytes of
    nested or unclosed tags."""
    t0 = time.perf_counter()
    p = parse_completion(text)
    correct, well_formed = judge(text, ["Paris"])
    voi = voi_reward(correct, well_formed, 0, 0)
    (otc,) = otc_group_rewards([correct], [well_formed], [0])
    assert time.perf_counter() - t0 < 5.0  # quadratic behaviour would take minutes
    assert not p.well_formed and voi["format"] == -0.5 and otc["format"] == -0.5
    assert all(math.isfinite(v) for v in (*voi.values(), *otc.values()))
