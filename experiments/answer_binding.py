"""Does a direct answer follow the policy's own thought? For every direct answer of an evaluation
whose thought states a gold answer but whose answer is wrong ("The capital of Mozambique is
Maputo." → `<answer>Mozambique</answer>`), the policy's probability, after that very thought and
`<answer>`, of the answer it gave and of the gold answer its thought stated (each followed by
`</answer>`, fp32, no sampling).

    python -m experiments.answer_binding --adapter results/economy/run_l_adapter \
        --eval results/economy/evals/grpo_l_step20_test_full.json --questions results/questions/test_full.jsonl

Prints one line per such answer, then how often the given answer was the likelier of the two.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from data.answers import normalize_answer
from data.questions import read_questions
from envs.protocol import build_prompt, parse_completion, thoughts
from grpo.logprobs import token_logprobs
from grpo.rewards import answer_grounded
from models.loading import load_model_and_tokenizer


def answer_logprob(model, tokenizer, context: str, answer: str) -> float:
    """log P(answer + "</answer>" | context) under `model`, summed over its tokens."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    full = tokenizer.encode(context + answer + "</answer>", add_special_tokens=False)
    if full[:len(ctx)] != ctx:
        raise ValueError(f"the context's tokens change when {answer!r} follows it")
    ids = torch.tensor([full])                                                  # (1, T)
    with torch.no_grad():
        logits = model(ids).logits[:, len(ctx) - 1:-1]                          # (1, A, V) predict the answer
    return float(token_logprobs(logits, ids[:, len(ctx):]).sum())


def contradictions(rows: list[dict], golds: dict[str, list[str]]) -> list[tuple[dict, str]]:
    """(row, the gold its thought states) for each wrong direct answer whose thought states a gold
    answer and not the answer given (`answer_grounded`: a thought "San José de Asunción" answered
    "San José de Asunción" states its answer, even though it holds the gold "San Jose")."""
    out = []
    for row in rows:
        if row["question"] not in golds:
            raise ValueError(f"question {row['question']!r} of the evaluation is not in the question file")
        if row["calls"] or row["em"] or answer_grounded(row["text"], row["question"]):
            continue
        thought = normalize_answer(" ".join(thoughts(row["text"])))
        stated = [g for g in golds[row["question"]] if f" {normalize_answer(g)} " in f" {thought} "]
        if stated:
            out.append((row, stated[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="the policy (a PEFT adapter folder)")
    ap.add_argument("--eval", required=True, help="an eval.json of that policy (rows with text)")
    ap.add_argument("--questions", required=True, help="the question file it was evaluated on (gold answers)")
    args = ap.parse_args()
    golds = {q.question: list(q.answers) for q in read_questions(args.questions)}
    rows = json.load(open(args.eval))["rows"]
    model, tokenizer = load_model_and_tokenizer(init_adapter=args.adapter)
    model.eval()
    cases, given_likelier = contradictions(rows, golds), 0
    for row, stated in cases:
        text = row["text"]
        context = build_prompt(tokenizer, row["question"]) + text[:text.index("<answer>") + len("<answer>")]
        given = parse_completion(text).answer
        p_given = math.exp(answer_logprob(model, tokenizer, context, given))
        p_stated = math.exp(answer_logprob(model, tokenizer, context, stated))
        given_likelier += p_given > p_stated
        print(f"{row['question']} | thought: {' '.join(thoughts(text))} | P({given!r}) = {p_given:.3f}, "
              f"P({stated!r}) = {p_stated:.3f}")
    direct_wrong = sum(1 for r in rows if not r["calls"] and not r["em"])
    print(f"{len(cases)} of {direct_wrong} wrong direct answers contradict a gold answer their thought states; "
          f"the given answer is the likelier in {given_likelier} of them")


if __name__ == "__main__":
    main()
