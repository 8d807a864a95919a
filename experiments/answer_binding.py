"""Does a direct answer follow the policy's own thought? For every direct answer of an evaluation
whose thought states a gold answer but whose answer is wrong ("The capital of Mozambique is
Maputo." → `<answer>Mozambique</answer>`), the policy's probability, after that very thought and
`<answer>` (and the space the policy wrote after it, if any), of the answer it gave and of the gold
answer its thought stated (each followed by `</answer>`, fp32, no sampling).

    python -m experiments.answer_binding --adapter results/economy/run_l_adapter \
        --eval results/economy/evals/grpo_l_step20_test_full.json --questions results/questions/test_full.jsonl

Prints one line per such answer, then how often the given answer was the likelier of the two.

With `--forced-recall`: the memory questions of each split of the offline task, each followed by the
thought its cold-start direct trace has (the base model's recall sentence, `data.thoughts.recall_sentence`)
and `<answer>`; the policy's greedy answer there (`grpo.rollout.rollout`, T = 0), right or not (exact match). On the training split
that is what the cold start was taught, on the held-out splits how well the answer binds to a
recalled fact it has not seen.

    python -m experiments.answer_binding --adapter results/cold_start/sft_adapter_hedge_all_714 --forced-recall
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from data.answers import exact_match, normalize_answer
from data.offline_task import build_offline_task
from data.thoughts import closed_book_replies, recall_sentence
from data.types import MEMORY, QAExample
from data.questions import read_questions
from envs.protocol import build_prompt, parse_completion, thoughts
from envs.search import EmptySearch
from grpo.logprobs import token_logprobs
from grpo.rollout import rollout
from grpo.rewards import answer_grounded
from models.loading import load_model_and_tokenizer
from models.tokenizer import continuation_ids


def answer_logprob(model, tokenizer, context: str, answer: str) -> float:
    """log P(answer + "</answer>" | context) under `model`, summed over its tokens."""
    ctx, full = continuation_ids(tokenizer, context, answer + "</answer>")
    ids = torch.tensor([full])                                                  # (1, T)
    with torch.no_grad():
        logits = model(ids).logits[:, len(ctx) - 1:-1]                          # (1, A, V) predict the answer
    return float(token_logprobs(logits, ids[:, len(ctx):]).sum())


def forced_recall_context(tokenizer, example: QAExample, replies: dict[str, str]) -> str:
    """The prompt, then the example's direct-trace thought (its recall sentence) and `<answer>`."""
    return build_prompt(tokenizer, example.question) + f"<thought>{recall_sentence(example, replies)}</thought><answer>"


def greedy_answers(model, tokenizer, contexts: list[str], max_new_tokens: int = 12, batch: int = 16) -> list[str]:
    """The greedy continuation of each context up to `</answer>` (or EOS, or `max_new_tokens`): the
    rollout's own decoding (G = 1, T = 0), in batches; a call is answered by a tool that finds nothing."""
    out = []
    for start in range(0, len(contexts), batch):
        ro = rollout(model, tokenizer, contexts[start:start + batch], EmptySearch(), group_size=1,
                     max_new_tokens=max_new_tokens, temperature=0.0)
        out += [t.replace(tokenizer.eos_token, "").split("</answer>")[0] for t in ro.texts]
    return out


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


def answer_slot(text: str) -> tuple[str, str]:
    """The completion through its last `<answer>`, and the whitespace the policy wrote after it
    (`…<answer> Tokyo` -> (`…<answer>`, " ")). The whitespace is scored with the answer, not put in the
    context: " Tokyo" is one token, so a context ending in a space would split it."""
    end = text.rindex("<answer>") + len("<answer>")
    rest = text[end:]
    return text[:end], rest[:len(rest) - len(rest.lstrip())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="the policy (a PEFT adapter folder)")
    ap.add_argument("--eval", help="an eval.json of that policy (rows with text)")
    ap.add_argument("--questions", help="the question file it was evaluated on (gold answers)")
    ap.add_argument("--forced-recall", action="store_true", help="answers after the recall thought, per split")
    args = ap.parse_args()
    if args.forced_recall:
        return forced_recall_report(args.adapter)
    if not (args.eval and args.questions):
        ap.error("--eval and --questions are required (or --forced-recall)")
    golds = {q.question: list(q.answers) for q in read_questions(args.questions)}
    rows = json.load(open(args.eval))["rows"]
    model, tokenizer = load_model_and_tokenizer(init_adapter=args.adapter)
    model.eval()
    cases, given_likelier = contradictions(rows, golds), 0
    for row, stated in cases:
        text = row["text"]
        head, space = answer_slot(text)
        context = build_prompt(tokenizer, row["question"]) + head
        given = parse_completion(text).answer
        p_given = math.exp(answer_logprob(model, tokenizer, context, space + given))
        p_stated = math.exp(answer_logprob(model, tokenizer, context, space + stated))
        given_likelier += p_given > p_stated
        print(f"{row['question']} | thought: {' '.join(thoughts(text))} | P({given!r}) = {p_given:.3f}, "
              f"P({stated!r}) = {p_stated:.3f}")
    direct_wrong = sum(1 for r in rows if not r["calls"] and not r["em"])
    print(f"{len(cases)} of {direct_wrong} wrong direct answers contradict a gold answer their thought states; "
          f"the given answer is the likelier in {given_likelier} of them")


def forced_recall_report(adapter: str) -> None:
    model, tokenizer = load_model_and_tokenizer(init_adapter=adapter)
    model.eval()
    task, replies = build_offline_task(0), closed_book_replies()
    for split in ("train", "validation", "test"):
        examples = [ex for ex in getattr(task, split) if ex.kind == MEMORY]
        answers = greedy_answers(model, tokenizer, [forced_recall_context(tokenizer, ex, replies) for ex in examples])
        wrong = [(ex, a) for ex, a in zip(examples, answers) if not exact_match(a, ex.answers)]
        print(f"{split}: {len(examples) - len(wrong)} of {len(examples)} right after the recall thought")
        for ex, a in wrong:
            print(f"    {ex.question} | {recall_sentence(ex, replies)} -> {a!r}")


if __name__ == "__main__":
    main()
