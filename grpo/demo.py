"""`make demo`: the whole offline pipeline on CPU, SmolLM2-135M-Instruct, ~20 minutes.

    0. the offline task: counts per kind and split (GeoNames data, no download)
    1. cold start: SFT on synthetic traces, so the model speaks the tag format
    2. GRPO from the SFT adapter, evaluated every 4 steps (Pareto plot + report)
    3. validate the last checkpoint
    4. what GRPO learns: the published policy (`results/economy/`) next to its cold start
       (`results/cold_start/`), greedy, on the balanced test set: EM, calls, searches per kind, and
       the questions where GRPO changed what the policy does (skipped if not published)

Each phase is an ordinary CLI run (`python -m grpo fit -c configs/demo_*.yaml`); this file
only chains them and says where the outputs are.
"""
from __future__ import annotations

import time
from pathlib import Path

from data.answers import exact_match
from data.offline_task import build_offline_task, summary
from data.questions import read_questions
from data.types import KINDS, MEMORY
from envs.search import LocalSearchEnv
from grpo.cli import main as cli

COLD_START = Path("results/cold_start/sft_adapter_cc_714")
PUBLISHED = Path("results/economy/grpo_adapter")
QUESTIONS = Path("results/questions/test_balanced.jsonl")


def _phase(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def run_policies(adapters: dict[str, Path], examples, env, model_name: str | None = None) -> dict[str, list]:
    """{label: one `InferenceResult` per example}: each adapter answers every question, greedy."""
    from grpo.infer import answer, load_for_inference

    results = {}
    for label, path in adapters.items():
        model, tokenizer = load_for_inference(str(path), model_name)
        results[label] = [answer(model, tokenizer, env, ex.question, temperature=0.0) for ex in examples]
    return results


def _right(result, ex) -> bool:
    return exact_match(result.answer or "", ex.answers)


def totals(results: dict[str, list], examples) -> str:
    """One line per policy: EM, tool calls per question, and the share searched of each kind."""
    lines = []
    width = max(map(len, results))
    for label, rows in results.items():
        em = sum(_right(r, ex) for r, ex in zip(rows, examples)) / len(examples)
        calls = sum(r.calls for r in rows) / len(examples)
        searched = []
        for kind in KINDS:
            of_kind = [r for r, ex in zip(rows, examples) if ex.kind == kind]
            if of_kind:
                share = sum(r.calls > 0 for r in of_kind) / len(of_kind)
                searched.append(f"{kind} searched {share:.2f} ({len(of_kind)} q)")
        lines.append(f"  {label:<{width}}  EM {em:.3f}  calls / q {calls:.2f}  " + "  ".join(searched))
    return "\n".join(lines)


def side_by_side(results: dict[str, list], examples, only_different: bool = False) -> str:
    """One line per question and policy: searched or not, the answer, right or wrong. With
    `only_different`, only the questions where the policies differ in searching or in being right."""
    lines = []
    width = max(map(len, results))
    for i, ex in enumerate(examples):
        rows = {label: results[label][i] for label in results}
        if only_different and len({(r.calls > 0, _right(r, ex)) for r in rows.values()}) == 1:
            continue
        lines.append(f"{ex.question}  [{ex.kind}; gold {ex.answers[0]}]")
        for label, r in rows.items():
            mark = "right" if _right(r, ex) else "wrong"
            how = f"searched {', '.join(r.queries)}" if r.calls else "answered directly"
            lines.append(f"  {label:<{width}}  {how:<34} -> {r.answer!s:<22} {mark}")
    return "\n".join(lines)


def show_what_grpo_learned(questions: Path = QUESTIONS) -> None:
    """The published policy next to its cold start on the balanced test set: totals, then every
    question where GRPO changed whether the policy searches or whether it is right."""
    if not (COLD_START.is_dir() and PUBLISHED.is_dir()):
        print(f"no published policy ({PUBLISHED} and {COLD_START}): skipped")
        return
    examples = read_questions(questions)
    env = LocalSearchEnv(build_offline_task(seed=0).documents)
    results = run_policies({"cold start": COLD_START, "GRPO": PUBLISHED}, examples, env)
    print(f"{questions} ({len(examples)} questions), greedy:")
    print(totals(results, examples))
    changed = side_by_side(results, examples, only_different=True)
    print("\nWhere GRPO changed what the policy does (searched or not, right or wrong):")
    print(changed or "  nowhere")


def main() -> None:
    t = _phase("0. offline task")
    print(summary(build_offline_task(seed=0)))
    t = _phase("1. cold start: SFT on synthetic tool-use traces (configs/demo_sft.yaml)")
    cli(["fit", "-c", "configs/demo_sft.yaml"])
    print(f"SFT: {time.perf_counter() - t:.0f} s")
    t = _phase("2. GRPO from the SFT adapter (configs/demo_grpo.yaml)")
    cli(["fit", "-c", "configs/demo_grpo.yaml"])
    print(f"GRPO: {time.perf_counter() - t:.0f} s")
    t = _phase("3. validate the last checkpoint")
    cli(["validate", "-c", "configs/demo_grpo.yaml", "--ckpt_path", "outputs/demo/checkpoints/last.ckpt"])
    print(f"validate: {time.perf_counter() - t:.0f} s")
    report = Path("outputs/demo/report")
    print("\nOutputs:")
    print(f"  report       {report / 'report.md'}")
    print(f"  Pareto plot  {report / 'pareto.png'}")
    print(f"  evaluation   {report / 'eval.md'} (the validated checkpoint, overall and per kind)")
    print("  adapters     outputs/demo/sft_adapter, outputs/demo/checkpoints/*.adapter")
    print("  TensorBoard  .venv/bin/tensorboard --logdir runs/demo")
    print("  inference    .venv/bin/python -m grpo.infer --checkpoint outputs/demo/checkpoints/last.ckpt "
          "--query 'What currency is used in Kenya?'")
    t = _phase(f"4. what GRPO learns: the published policy ({PUBLISHED}) next to its cold start")
    show_what_grpo_learned()
    print(f"comparison: {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
