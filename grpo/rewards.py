"""Rewards for a search-tool agent: the value-of-information (VOI) and OTC rewards.

Pure Python (no torch). A completion is read once (`judge`: is its answer correct, is it
well-formed; `answer_grounded`: do its own thoughts state its answer); a reward is then a function
of those facts and of the tool-call counts, which the rollout supplies, because the environment,
not the text, knows which calls were executed and which were refused. The completion format and
its tolerant parser (`parse_completion`) are the tool protocol's (`envs/protocol.py`); exact match
is HotpotQA's (`data/answers.py`).

References
- OTC-PO: Wang et al. 2025, "Acting Less is Reasoning More! Teaching Model to Act Efficiently"
  (first titled "OTC: Optimal Tool Calls via Reinforcement Learning"), arXiv 2504.14870, §3.
- The value-of-information (VOI) reward table is this project's own design, not a paper's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from data.answers import exact_match, normalize_answer
from envs.protocol import parse_completion, thoughts

# ---------------------------------------------------------------------------------------------
# Reading a completion


def judge(text: str, golds: Sequence[str]) -> tuple[bool, bool]:
    """(correct, well_formed) of one completion, what every reward and metric reads from its text:

        correct     = the parsed answer exact-matches a gold answer (EM = 1; no answer: False)
        well_formed = `parse_completion(text).well_formed` (tags in order, closed, an answer last)
    """
    parsed = parse_completion(text)
    return parsed.answer is not None and exact_match(parsed.answer, golds) == 1.0, parsed.well_formed


def answer_grounded(text: str, question: str) -> bool:
    """Whether the completion's answer is stated in its own thoughts: the normalized answer occurs as
    whole words in the text of its closed <thought> blocks more often than in the question (HotpotQA
    normalisation, `normalize_answer`), so that naming the question's own subject is not stating it:

        "<thought>The capital of Kenya is Nairobi.</thought><answer>Nairobi</answer>"          True
        "<thought>The capital of Djibouti is Djibouti.</thought><answer>Djibouti</answer>"     True
        "<thought>The capital of Mozambique is Maputo.</thought><answer>Mozambique</answer>"   False
        "<thought>Guam is an island in the Pacific.</thought><answer>Asia</answer>"           False
    A completion without an answer has nothing to ground: True (it is wrong and malformed already).
    """
    parsed = parse_completion(text).answer
    if parsed is None:
        return True
    answer = normalize_answer(parsed)

    def count(haystack: str) -> int:  # whole-word occurrences of the answer
        return len(re.findall(rf"(?<!\S){re.escape(answer)}(?!\S)", normalize_answer(haystack)))
    return bool(answer) and count(" ".join(thoughts(text))) > count(question)


# ---------------------------------------------------------------------------------------------
# Value-of-information (VOI) reward


@dataclass(frozen=True)
class VOIWeights:
    """Signed reward weights; the total is the plain sum of the terms."""
    correct: float = 1.0
    """Answer exact-matches a gold answer."""
    wrong: float = -0.5
    """Wrong answer, or no answer at all."""
    well_formed: float = 0.1
    """Completion is well-formed (`parse_completion(text).well_formed`)."""
    malformed: float = -0.5
    """Completion is not well-formed."""
    per_call: float = -0.05
    """Per executed tool call: the price of information."""
    per_call_no_obs: float = -0.2
    """Per call that was not run: refused over the tool budget (it got the budget observation), or never closed."""
    direct_bonus: float = 0.1
    """Correct answer without any tool call, executed or attempted."""
    wrong_direct: float = 0.0
    """Wrong answer (or none) without any tool call, executed or attempted, on top of `wrong`: the
    price of a confident guess. With a direct bonus b and this penalty x, answering directly beats
    one search (accuracy q) iff the direct accuracy p > (1.5 q - 0.05 + x) / (1.5 + b + x) at the
    other default weights: a large b alone also makes 50/50 guesses pay; x takes that back, but it
    also raises the bar for known facts (b = 1, x = 1 collapsed to always-search: results/economy)."""
    ungrounded_direct: float = 0.0
    """An answer without any tool call that its own thoughts do not state (`answer_grounded`), on
    top of the rest, right or wrong: System 1 may answer only what its recall has just said. Aimed
    at a textual pattern that carries over from one question to another ("Guam is an island in the
    Pacific." → "Asia"), where a price on wrong answers only teaches about the questions trained on."""


def _check_counts(num_calls: int, num_calls_no_obs: int) -> None:
    if num_calls < 0 or num_calls_no_obs < 0:
        raise ValueError(f"tool-call counts must be >= 0, got num_calls={num_calls}, "
                         f"num_calls_no_obs={num_calls_no_obs}")


def voi_reward(correct: bool, well_formed: bool, num_calls: int, num_calls_no_obs: int,
               weights: VOIWeights = VOIWeights(), grounded: bool = True) -> dict[str, float]:
    """Value-of-information reward: be right, use the tool only when the answer is worth it.

    total = correct + format + tool_cost + no_obs_penalty + direct_bonus + guess_penalty
            + ungrounded_penalty, where
      correct        = w.correct if correct else w.wrong                  (`judge`; no answer -> wrong)
      format         = w.well_formed if well_formed else w.malformed
      tool_cost      = w.per_call * num_calls
      no_obs_penalty = w.per_call_no_obs * num_calls_no_obs          (refused or unclosed calls)
      direct_bonus   = w.direct_bonus if correct and num_calls == num_calls_no_obs == 0 else 0
      guess_penalty  = w.wrong_direct if not correct and num_calls == num_calls_no_obs == 0 else 0
      ungrounded_penalty = w.ungrounded_direct if not grounded and num_calls == num_calls_no_obs == 0 else 0
    num_calls / num_calls_no_obs come from the rollout (the environment counts them); grounded
    from the text (`answer_grounded`).
    With the default weights: correct and direct 1.2; correct with 2 calls 1.0; wrong -0.4;
    and with max_tool_calls=5, max_no_obs=1 every total lies in [-1.45, 1.2]
    (see voi_reward_bounds).
    """
    _check_counts(num_calls, num_calls_no_obs)
    direct = num_calls == num_calls_no_obs == 0  # no call executed, refused or left unclosed
    parts = {
        "correct": weights.correct if correct else weights.wrong,
        "format": weights.well_formed if well_formed else weights.malformed,
        "tool_cost": weights.per_call * num_calls,
        "no_obs_penalty": weights.per_call_no_obs * num_calls_no_obs,
        "direct_bonus": weights.direct_bonus if correct and direct else 0.0,
        "guess_penalty": weights.wrong_direct if not correct and direct else 0.0,
        "ungrounded_penalty": weights.ungrounded_direct if not grounded and direct else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def voi_reward_bounds(weights: VOIWeights, max_tool_calls: int, max_no_obs: int) -> tuple[float, float]:
    """(lo, hi) enclosing every voi_reward total when num_calls <= max_tool_calls and
    num_calls_no_obs <= max_no_obs: the sum of each term's own min (max). Exact for the default
    weights, e.g. (5, 1) -> (-0.5 - 0.5 - 0.25 - 0.2, 1.0 + 0.1 + 0.1) = (-1.45, 1.2).
    """
    terms = [(weights.correct, weights.wrong), (weights.well_formed, weights.malformed),
             (0.0, weights.per_call * max_tool_calls), (0.0, weights.per_call_no_obs * max_no_obs),
             (0.0, weights.direct_bonus), (0.0, weights.wrong_direct), (0.0, weights.ungrounded_direct)]
    return sum(min(t) for t in terms), sum(max(t) for t in terms)


# ---------------------------------------------------------------------------------------------
# OTC reward (Wang et al. 2025, arXiv 2504.14870)


@dataclass(frozen=True)
class OTCWeights:
    """Weights of the OTC-GRPO reward; the format term is ours (as in VOIWeights), not the paper's."""
    alpha: float = 1.0
    """Scale of the tool-integrated correctness term (the paper's alpha)."""
    c: float = 6.0
    """Smoothing constant of the n = 0 branch, cos(m*pi/(2m + c)); larger c = slower decay. 6 is the
    public reference implementation's default: one call where none was needed keeps cos(pi/8) = 0.92
    of the reward (c = 1 would keep cos(pi/3) = 0.5)."""
    well_formed: float = 0.1
    """Format term for a well-formed completion, as in VOIWeights."""
    malformed: float = -0.5
    """Format term for a malformed completion, as in VOIWeights."""


def otc_tool_factor(m: int, n: int, c: float = 6.0) -> float:
    """OTC-GRPO tool reward r_tool(m, n) in [0, 1], m = calls of this sample, n = optimal calls.

        r_tool = 1                          if f(m, n) = n = 0
               = cos(m * pi / (2m + c))     if n = 0
               = sin(f(m, n) * pi / (2n))   otherwise
        f(m, n) = 0 if m = n = 0;  m if n = 0;  2nm / (m + n) otherwise

    So r_tool = 1 exactly at m = n and falls towards 0 as m grows (f -> 2n, sin(pi) = 0);
    for m < n it is also < 1. Source: arXiv 2504.14870 §3 (OTC-GRPO), checked against a public
    verl-based implementation of it (`map_to_2n` / `oct_*_penalty`), whose default c = 6 is ours too
    (`OTCWeights.c`).
    """
    if m < 0 or n < 0 or c <= 0:
        raise ValueError(f"otc_tool_factor needs m >= 0, n >= 0, c > 0; got m={m}, n={n}, c={c}")
    if n == 0:
        return 1.0 if m == 0 else math.cos(m * math.pi / (2 * m + c))
    f = 2 * n * m / (m + n)
    return max(0.0, math.sin(f * math.pi / (2 * n)))


def otc_optimal_calls(correct: Sequence[bool], num_calls: Sequence[int]) -> int | None:
    """n = min calls among the correct samples of one group (OTC-GRPO); None if none is correct."""
    return min((m for ok, m in zip(correct, num_calls) if ok), default=None)


def otc_group_rewards(correct: Sequence[bool], well_formed: Sequence[bool], num_calls: Sequence[int],
                      weights: OTCWeights = OTCWeights()) -> list[dict[str, float]]:
    """OTC-GRPO reward for the G samples of ONE group (same prompt, same golds), from `judge`'s facts.

        total_i   = correct_i + format_i
        correct_i = alpha * r_tool(m_i, n) * EM_i      (paper: r^tool = alpha * r_tool * r_phi)
        format_i  = w.well_formed if well-formed else w.malformed
        n         = min{ m_j : sample j correct }      (the group's estimate of optimal calls)
    m_i counts every call sample i ATTEMPTED: executed, refused over the budget and never closed
    (the module passes num_calls + num_calls_no_obs), so calls past the budget are not free.
    tool_factor_i = r_tool(m_i, n) is returned for logging; it is not added to the total.
    Wrong samples get tool_factor 1 (their correctness term is 0 whatever it is), as the public
    implementation does. When no sample is correct, n is undefined: every tool_factor is 1 and the
    totals are the format terms only; the group then carries no correctness signal, which is the
    truth (we do not know how many calls would have sufficed).
    """
    if not len(correct) == len(well_formed) == len(num_calls):
        raise ValueError(f"correct ({len(correct)}), well_formed ({len(well_formed)}) and num_calls "
                         f"({len(num_calls)}) differ in length")
    n = otc_optimal_calls(correct, num_calls)
    out = []
    for ok, formed, m in zip(correct, well_formed, num_calls):
        _check_counts(m, 0)
        factor = otc_tool_factor(m, n, weights.c) if ok else 1.0
        parts = {"correct": weights.alpha * factor * float(ok),
                 "format": weights.well_formed if formed else weights.malformed}
        parts["total"] = parts["correct"] + parts["format"]
        parts["tool_factor"] = factor
        out.append(parts)
    return out


# ---------------------------------------------------------------------------------------------
# Guard


def check_finite_rewards(components: Sequence[Mapping[str, float]], sample_ids: Sequence | None = None) -> None:
    """Raise ValueError naming the sample and the component of the first non-finite value."""
    for i, parts in enumerate(components):
        for key, value in parts.items():
            if not math.isfinite(value):
                who = sample_ids[i] if sample_ids is not None else i
                raise ValueError(f"reward component {key!r} of sample {who} (index {i}) is {value}")
