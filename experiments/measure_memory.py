"""Measure which memory candidates (capitals, continents) the base model really answers.

Closed book, no tags: the model gets a plain "answer briefly" prompt and the question; a
reply counts as correct when a normalized gold answer appears in the normalized reply
(HotpotQA normalization). Greedy decoding decides the kind (MEMORY iff correct); `--samples`
completions at T = 1 give the sampled accuracy, recorded for information.

    python -m experiments.measure_memory     # writes data/smollm2_memory.json (~5 min on CPU)

Any question file (`data.questions` format) can be measured the same way, and written back with
each question's kind set by the measurement (memory iff the greedy reply holds a gold), e.g. a
probe from a domain the search tool does not cover:

    python -m experiments.measure_memory --questions results/questions/probe_general.jsonl \
        --out outputs/probe_memory.json --label-out results/questions/probe_general_labelled.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from data.answers import contains_gold
from data.files import atomic_write
from data.offline_task import DEFAULT_MEMORY_FILE, memory_candidates
from data.questions import read_questions, write_questions
from data.types import LOOKUP, MEMORY
from envs.protocol import build_prompt
from grpo.rollout import rollout
from models.loading import SMOLLM2, load_model_and_tokenizer

CLOSED_BOOK_SYSTEM = "You are a helpful assistant. Answer the question briefly."


def _no_tool(query: str) -> str:
    return "No tool is available."


def measure(model_name: str = SMOLLM2, samples: int = 4, batch: int = 8, max_new_tokens: int = 32, seed: int = 0,
            questions=None):
    """{question id: greedy_correct, sampled_accuracy, greedy_reply} of `questions` (default: the
    offline task's memory candidates)."""
    model, tokenizer = load_model_and_tokenizer(model_name)
    model.eval()
    questions = memory_candidates() if questions is None else questions
    gen = torch.Generator().manual_seed(seed)
    results = {}
    t0 = time.perf_counter()
    for start in range(0, len(questions), batch):
        qs = questions[start:start + batch]
        prompts = [build_prompt(tokenizer, q.question, system=CLOSED_BOOK_SYSTEM) for q in qs]
        greedy = rollout(model, tokenizer, prompts, _no_tool, group_size=1, max_new_tokens=max_new_tokens,
                         temperature=0.0)
        sampled = rollout(model, tokenizer, prompts, _no_tool, group_size=samples, max_new_tokens=max_new_tokens,
                          temperature=1.0, generator=gen)
        for i, q in enumerate(qs):
            hits = [contains_gold(t, q.answers) for t in sampled.texts[i * samples:(i + 1) * samples]]
            results[q.id] = {"greedy_correct": contains_gold(greedy.texts[i], q.answers),
                             "sampled_accuracy": sum(hits) / samples,
                             "greedy_reply": greedy.texts[i].replace(tokenizer.eos_token, "").strip()}
        print(f"{start + len(qs)}/{len(questions)} questions, {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def labelled(questions, results: dict) -> list:
    """The questions with kind MEMORY where the greedy closed-book reply held a gold, else LOOKUP."""
    return [replace(q, kind=MEMORY if results[q.id]["greedy_correct"] else LOOKUP) for q in questions]


def report(results: dict, groups=("capital", "continent")) -> str:
    lines = []
    for kind in groups:
        rows = {k: v for k, v in results.items() if k.startswith(kind + "/")}
        greedy = sum(v["greedy_correct"] for v in rows.values())
        sampled = sum(v["sampled_accuracy"] for v in rows.values()) / max(len(rows), 1)
        lines.append(f"{kind:10s} greedy {greedy}/{len(rows)} ({greedy / max(len(rows), 1):.0%}), "
                     f"sampled accuracy {sampled:.0%}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", type=Path, default=DEFAULT_MEMORY_FILE)
    ap.add_argument("--questions", type=Path, default=None, help="a question file (default: the memory candidates)")
    ap.add_argument("--label-out", type=Path, default=None, help="write --questions back with measured kinds")
    args = ap.parse_args(argv)
    if args.label_out and not args.questions:
        ap.error("--label-out needs --questions")
    if args.questions and args.out == DEFAULT_MEMORY_FILE:
        ap.error(f"--questions: give --out too (the default {DEFAULT_MEMORY_FILE} holds the offline task's measurement)")
    questions = read_questions(args.questions) if args.questions else None
    results = measure(args.model, samples=args.samples, questions=questions)
    payload = {"model": args.model, "method": "closed-book, greedy decides; gold contained in reply",
               "results": results}
    text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # never half-written
    prefixes = sorted({qid.split("/")[0] for qid in results})
    print(report(results, prefixes))
    print(f"written: {args.out}")
    if args.label_out:
        rows = labelled(questions, results)
        write_questions(rows, args.label_out)
        print(f"written: {args.label_out} ({sum(q.kind == MEMORY for q in rows)} memory, "
              f"{sum(q.kind == LOOKUP for q in rows)} lookup)")


if __name__ == "__main__":
    main()
