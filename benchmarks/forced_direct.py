"""Is the knowledge still there after a cold start? Force the direct-answer branch and look.

For each held-out memory question, the assistant turn is started for the model and it continues
greedily (no tool is reachable once the answer is open):

    --prefix recall   <thought>The capital of Greece is        (continents: "<thought>Greece is")
    --prefix plain    <thought>I know this.</thought><answer>

EM is taken on the <answer> of prefix + continuation. Separates "the SFT erased the fact" from
"the SFT chose to search": a cold start can keep the fact yet never take the direct branch.

    python benchmarks/forced_direct.py --adapter outputs/adapter_r160 --prefix recall
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.answers import exact_match  # noqa: E402
from data.offline_task import build_offline_task  # noqa: E402
from data.types import MEMORY  # noqa: E402
from envs.protocol import build_prompt, parse_completion  # noqa: E402
from experiments.eval_cold_start import select_questions  # noqa: E402
from grpo.infer import load_for_inference  # noqa: E402
from grpo.rollout import rollout  # noqa: E402


def forced_prefix(ex, style: str) -> str:
    if style == "plain":
        return "<thought>I know this.</thought><answer>"
    country = ex.hops[0]
    return f"<thought>The capital of {country} is" if ex.type == "capital" else f"<thought>{country} is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--prefix", choices=("recall", "plain"), required=True)
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    task = build_offline_task(0)
    questions = [ex for ex in select_questions(task, args.split, None, 0) if ex.kind == MEMORY]
    model, tokenizer = load_for_inference(args.adapter)
    prefixes = [forced_prefix(ex, args.prefix) for ex in questions]
    prompts = [build_prompt(tokenizer, ex.question) + p for ex, p in zip(questions, prefixes)]
    ro = rollout(model, tokenizer, prompts, lambda q: "No tool is available.", group_size=1,
                 max_new_tokens=args.max_new_tokens, temperature=0.0, max_tool_calls=0)
    hits = 0
    for ex, prefix, text in zip(questions, prefixes, ro.texts):
        em = exact_match(parse_completion(prefix + text).answer or "", ex.answers)
        hits += em
        print(f"{em:.0f} {ex.id:<14} {(prefix + text)[:110]!r}")
    print(f"forced {args.prefix} branch, {args.adapter}: memory EM {hits}/{len(questions)} = {hits / len(questions):.3f}")


if __name__ == "__main__":
    main()
