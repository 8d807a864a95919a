"""Does a cold start keep what the model knows? Per-kind evaluation of an SFT adapter.

Loads SmolLM2 + a PEFT adapter, runs agentic rollouts (`grpo.rollout.rollout`, group_size 1,
the real search env of the offline task) on held-out questions, greedy AND sampled (T = 1, or
`--temperature`; `--samples` completions per question), and prints one row per (decoding, group):

    memory               kind MEMORY: capitals/continents the base model answers greedily closed-book
    lookup               kind LOOKUP: everything else
    lookup/unknown-mem   the capital/continent questions the base model does NOT know (a subset of lookup)

    em           exact match of the final <answer> (HotpotQA normalization), whether searched or not
    direct_em    share of questions answered correctly WITHOUT a search (knowledge kept)
    well_formed  share of completions that parse well-formed and end in an answer (envs.protocol)
    search_rate  share of questions with at least one executed call
    direct_acc   EM among the completions that did not search: the p of a direct answer that
                 decides, at that temperature, whether answering beats searching (README, Results)

The base model's closed-book accuracy on the same memory questions (greedy, and sampled at T = 1
over 4 samples) is read from `data/smollm2_memory.json` (`python -m experiments.measure_memory`,
"gold contained in the reply"); by construction greedy is 1.0 on kind MEMORY, so the knowledge
ratio is memory greedy EM / base greedy accuracy.

    python -m experiments.eval_cold_start --adapter outputs/sft_smollm2_adapter --split heldout
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data.answers import exact_match
from data.files import atomic_write
from data.offline_task import DEFAULT_MEMORY_FILE, MEMORY_TYPES, build_offline_task, read_memory_json
from data.types import LOOKUP, MEMORY
from envs.protocol import build_prompt, parse_completion
from envs.search import LocalSearchEnv
from grpo.rollout import rollout

UNKNOWN_MEMORY = "lookup/unknown-mem"
GROUPS = (MEMORY, LOOKUP, UNKNOWN_MEMORY)
METRICS = ("em", "direct_em", "well_formed", "search_rate")


def select_questions(task, split: str, memory_limit: int | None, lookup_limit: int | None):
    """Memory questions first, then lookups (each in split order), capped by the limits.

    split: "test", "validation", or "heldout" (validation + test: twice the ~19 memory questions).
    """
    pools = {"test": task.test, "validation": task.validation, "heldout": task.validation + task.test}
    if split not in pools:
        raise ValueError(f"--split {split!r}: expected one of {sorted(pools)}")
    memory = [ex for ex in pools[split] if ex.kind == MEMORY][:memory_limit]
    lookup = [ex for ex in pools[split] if ex.kind == LOOKUP][:lookup_limit]
    return memory + lookup


def score(ex, text: str, calls: int) -> dict:
    parsed = parse_completion(text)
    em = exact_match(parsed.answer or "", ex.answers)
    return {"id": ex.id, "kind": ex.kind, "type": ex.type, "em": em, "direct_em": em * (calls == 0),
            "well_formed": float(parsed.well_formed and parsed.answer is not None),
            "search_rate": float(calls > 0), "calls": calls, "text": text}


def groups_of(row: dict) -> list[str]:
    """The row's kind, plus UNKNOWN_MEMORY for a capital/continent question of kind LOOKUP."""
    return [row["kind"]] + ([UNKNOWN_MEMORY] if row["kind"] == LOOKUP and row["type"] in MEMORY_TYPES else [])


def table(rows_by_mode: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """{"<mode>/<group>": {metric: mean, "n": count, "direct_acc": EM without a search or None}}."""
    out = {}
    for mode, rows in rows_by_mode.items():
        for group in GROUPS:
            rs = [r for r in rows if group in groups_of(r)]
            if rs:
                direct = [r for r in rs if not r["search_rate"]]
                out[f"{mode}/{group}"] = {"n": len(rs)} | {m: sum(r[m] for r in rs) / len(rs) for m in METRICS} | \
                    {"direct_acc": sum(r["em"] for r in direct) / len(direct) if direct else None}
    return out


def base_closed_book(memory_ids: list[str], memory_file: Path = DEFAULT_MEMORY_FILE) -> dict[str, float]:
    """The base model's measured closed-book greedy and sampled accuracy on these questions."""
    results = read_memory_json(memory_file, required=True)["results"]
    rows = [results[i] for i in memory_ids if i in results]
    if not rows:
        return {}
    return {"n": len(rows), "greedy": sum(r["greedy_correct"] for r in rows) / len(rows),
            "sampled": sum(r["sampled_accuracy"] for r in rows) / len(rows)}


def run(model, tokenizer, questions, env, temperature: float, batch: int, max_new_tokens: int,
        generator: torch.Generator, samples: int = 1) -> list[dict]:
    """One row per completion: `samples` completions per question (rows of a question adjacent)."""
    rows = []
    for start in range(0, len(questions), batch):
        qs = questions[start:start + batch]
        prompts = [build_prompt(tokenizer, ex.question) for ex in qs]
        ro = rollout(model, tokenizer, prompts, env, group_size=samples, max_new_tokens=max_new_tokens,
                     temperature=temperature, max_tool_calls=5, max_obs_tokens=160, generator=generator)
        rows += [score(ex, ro.texts[i * samples + j], int(ro.num_calls[i * samples + j]))
                 for i, ex in enumerate(qs) for j in range(samples)]
    return rows


def format_table(results: dict[str, dict[str, float]], base: dict[str, float]) -> str:
    lines = [f"{'decoding/group':<26}{'n':>4}" + "".join(f"{m:>13}" for m in METRICS + ('direct_acc',))]
    for key, m in results.items():
        acc = "n/a" if m["direct_acc"] is None else f"{m['direct_acc']:.3f}"
        lines.append(f"{key:<26}{m['n']:>4}" + "".join(f"{m[k]:>13.3f}" for k in METRICS) + f"{acc:>13}")
    if base:
        lines.append(f"base closed-book on the {base['n']} memory questions: greedy {base['greedy']:.3f}, "
                     f"sampled (T=1) {base['sampled']:.3f}")
        for mode in ("greedy", "sampled"):
            if f"{mode}/{MEMORY}" in results and base[mode]:
                ratio = results[f"{mode}/{MEMORY}"]["em"] / base[mode]
                lines.append(f"knowledge ratio, {mode}: memory EM / base closed-book {mode} = {ratio:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder ('none': the base model)")
    ap.add_argument("--model", default=None, help="base model (default: smollm2-135m-instruct; 'tiny' for tests)")
    ap.add_argument("--split", default="heldout", help="test | validation | heldout (validation + test)")
    ap.add_argument("--memory-limit", type=int, default=None, help="at most this many memory questions")
    ap.add_argument("--lookup-limit", type=int, default=64, help="at most this many lookup questions")
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled mode")
    ap.add_argument("--samples", type=int, default=1, help="completions per question in the sampled mode")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="task split seed (= SFT data.seed) and sampler seed")
    ap.add_argument("--out", type=Path, default=None, help="write the table and every completion (JSON)")
    args = ap.parse_args(argv)
    if not args.temperature > 0 or args.samples < 1:
        ap.error(f"--temperature must be > 0 and --samples >= 1, got {args.temperature} and {args.samples}")

    from grpo.infer import load_for_inference

    task = build_offline_task(args.seed)
    questions = select_questions(task, args.split, args.memory_limit, args.lookup_limit)
    env = LocalSearchEnv(task.documents)
    model, tokenizer = load_for_inference(args.adapter, args.model)
    gen = torch.Generator().manual_seed(args.seed)
    rows_by_mode, t0 = {}, time.perf_counter()
    for mode in args.modes:
        sampled = mode == "sampled"
        rows_by_mode[mode] = run(model, tokenizer, questions, env, args.temperature if sampled else 0.0,
                                 args.batch, args.max_new_tokens, gen, args.samples if sampled else 1)
        print(f"{mode}: {len(questions)} questions, {time.perf_counter() - t0:.0f} s", flush=True)
    results = table(rows_by_mode)
    base = base_closed_book([ex.id for ex in questions if ex.kind == MEMORY])
    print(f"adapter {args.adapter}, split {args.split}")
    print(format_table(results, base))
    if args.out:
        payload = {"adapter": args.adapter, "split": args.split, "temperature": args.temperature,
                   "samples": args.samples, "results": results, "base_closed_book": base,
                   "rows": rows_by_mode}
        text = json.dumps(payload, indent=1, ensure_ascii=False) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
