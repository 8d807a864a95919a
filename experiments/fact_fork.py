"""Where a policy decides to search: its probability of the fact and of the hedge at the fact token.

The cold starts' thoughts fork at the fact token: "The capital of Cyprus is" continues with
" Nicosia." (answer directly) or " not something I know; I will search for Cyprus." (search). For
every memory question of an evaluation this takes the policy's own greedy completion, cuts it at
that fork (`fork_offset`), and prints, at the sampling temperature, the probability that the next
token starts a gold answer (`fact_and_hedge`: any of its aliases) and that it is the hedge's " not",
beside what the greedy policy did and the base model's sampled closed-book accuracy
(`sampled_accuracy` of the memory file); then the chance that a group of G samples holds at least
one that states the fact, 1 - (1 - p)^G (`group_hit`): a group with none cannot learn to answer
directly.

    python -m experiments.fact_fork --adapter results/economy/grpo_adapter \
        --eval results/economy/evals/grpo_cc_h_seed0_step30_test.json --questions results/questions/test_balanced.jsonl

Without `--adapter` the base model is scored at the same cuts: what it would have said at the fork of
that policy's thought (at `--temperature 1`, the target of the SFT's `fork_target: base`). The
probabilities are fp32 forwards of one context each (no sampling); `--temperature` is the training
rollout's (configs/grpo_economy.yaml: 0.7).
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import torch

from data.offline_task import DEFAULT_MEMORY_FILE
from data.questions import read_questions
from data.thoughts import HEDGE, fork_offset, sampled_accuracies
from data.types import MEMORY
from envs.protocol import build_prompt
from models.loading import load_model_and_tokenizer
from models.tokenizer import first_token


def fork_probs(model, tokenizer, context: str, continuations: Sequence[str], temperature: float = 1.0) -> list[float]:
    """P(first token of each continuation | context) under softmax(logits / temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    firsts = [first_token(tokenizer, context, c) for c in continuations]
    ctx = tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1].float()          # (V,) the next token
    p = torch.softmax(logits / temperature, dim=-1)
    return [float(p[t]) for t in firsts]


def fact_and_hedge(model, tokenizer, context: str, facts: Sequence[str], temperature: float = 1.0) -> tuple[float, float]:
    """(P(the next token starts one of `facts`), P(it is the hedge's " not")), from one forward. Each fact
    is written as it would follow the context (" Nicosia"); their distinct first tokens are summed once
    each (" William Shakespeare" and " Shakespeare" are two ways to state one fact; " Shakespeare" and
    " Shakespeare's" one way)."""
    distinct = list({first_token(tokenizer, context, f): f for f in facts if f}.values())
    *p_facts, p_hedge = fork_probs(model, tokenizer, context, distinct + [HEDGE], temperature)
    return sum(p_facts), p_hedge


def group_hit(p: float, group_size: int) -> float:
    """Chance that at least one of `group_size` independent samples takes a branch of probability p."""
    return 1.0 - (1.0 - p) ** group_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None,
                    help="the policy (a PEFT adapter folder); without it the base model, scored at the forks of --eval's completions")
    ap.add_argument("--eval", required=True, help="an eval.json of that policy (rows with id, kind, text)")
    ap.add_argument("--questions", required=True, help="the question file it was evaluated on (gold answers)")
    ap.add_argument("--memory", default=str(DEFAULT_MEMORY_FILE), help="closed-book measurement (sampled_accuracy)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    golds = {q.question: list(q.answers) for q in read_questions(args.questions)}
    sampled = sampled_accuracies(args.memory)
    rows = [r for r in json.load(open(args.eval))["rows"] if r["kind"] == MEMORY]
    missing = [r["question"] for r in rows if r["question"] not in golds]
    if missing:
        ap.error(f"{len(missing)} questions of {args.eval} are not in {args.questions}, e.g. {missing[0]!r}")
    model, tokenizer = load_model_and_tokenizer(init_adapter=args.adapter)
    model.eval()
    by_choice: dict[bool, list[float]] = {True: [], False: []}
    print(f"{'question':44s} {'greedy':7s} {'P(fact)':>7s} {'P(not)':>7s} {'group':>6s} {'base sampled':>12s}")
    for r in rows:
        cut = fork_offset(r["text"], golds[r["question"]])
        searched = r["calls"] > 0
        if cut is None:
            print(f"{r['question'][:44]:44s} {'search' if searched else 'direct':7s} (no fork in its thought)")
            continue
        context = build_prompt(tokenizer, r["question"]) + r["text"][:cut]
        p_fact, p_hedge = fact_and_hedge(model, tokenizer, context, [" " + g for g in golds[r["question"]]],
                                         args.temperature)
        by_choice[searched].append(p_fact)
        acc = sampled.get(r.get("id", ""), float("nan"))
        print(f"{r['question'][:44]:44s} {'search' if searched else 'direct':7s} {p_fact:7.3f} {p_hedge:7.3f} "
              f"{group_hit(p_fact, args.group_size):6.2f} {acc:12.2f}")
    for searched, ps in by_choice.items():
        if ps:
            print(f"{'searched' if searched else 'answered directly'}: {len(ps)} questions, mean P(fact) {sum(ps) / len(ps):.3f}")


if __name__ == "__main__":
    main()
