"""P(fact) and P(" not") at the fork of the capital template thought, for the memory capitals of a question file.

`experiments.fact_fork` cuts each policy's own greedy thought; this one puts the same template before every
policy, "<thought>The capital of X is", so that policies (and training questions, which have no evaluation)
compare at one context. Used for the training capitals in results/economy/experiments.md ("Where the policy
forks", "Several passes over the same capitals"):

    python -m experiments.capital_forks results/questions/train_repeat_capitals.jsonl \
        results/cold_start/sft_adapter_cc_714 results/economy/grpo_adapter
"""
from __future__ import annotations

import argparse
import re

from data.questions import read_questions
from data.thoughts import HEDGE
from data.types import MEMORY
from envs.protocol import build_prompt
from experiments.fact_fork import fork_probs
from models.loading import load_model_and_tokenizer

CAPITAL = re.compile(r"What is the capital of (.+)\?")


def capital_fork(model, tokenizer, question: str, answer: str, temperature: float = 0.7) -> tuple[float, float]:
    """(P(" " + answer), P(" not")) of their first tokens after the prompt and "<thought>The capital of X is"."""
    m = CAPITAL.fullmatch(question)
    if m is None:
        raise ValueError(f"not a capital question: {question!r}")
    context = build_prompt(tokenizer, question) + f"<thought>The capital of {m.group(1)} is"
    fact, hedge = fork_probs(model, tokenizer, context, [" " + answer, HEDGE], temperature)
    return fact, hedge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", help="a question file; its memory questions of type capital are scored")
    ap.add_argument("adapters", nargs="+", help="PEFT adapter folders, one column each")
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    qs = [q for q in read_questions(args.questions) if q.kind == MEMORY and q.type == "capital"]
    cols = {}
    for adapter in args.adapters:
        model, tok = load_model_and_tokenizer(init_adapter=adapter)
        model.eval()
        cols[adapter] = [capital_fork(model, tok, q.question, q.answers[0], args.temperature) for q in qs]
    print(f"{len(qs)} memory capitals; P(fact) / P(not) at T = {args.temperature}")
    for adapter, ps in cols.items():
        facts = [f for f, _ in ps]
        print(f"{adapter:45s} mean P(fact) {sum(facts) / len(facts):.3f}  fact > not {sum(f > h for f, h in ps)}")
    for i, q in enumerate(qs):
        print(f"{q.question[:40]:40s}", " ".join(f"{cols[a][i][0]:.2f}/{cols[a][i][1]:.2f}" for a in cols))


if __name__ == "__main__":
    main()
