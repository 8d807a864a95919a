"""`make demo`: the whole offline pipeline on CPU, SmolLM2-135M-Instruct, ~20 minutes.

    0. the offline task: counts per kind and split (GeoNames data, no download)
    1. cold start: SFT on synthetic traces, so the model speaks the tag format
    2. GRPO from the SFT adapter, evaluated every 4 steps (Pareto plot + report)
    3. validate the last checkpoint
    4. what GRPO learns: the published policy (`results/economy/`) next to its cold start
       (`results/cold_start/`), greedy, on the same held-out questions (skipped if not published)

Each phase is an ordinary CLI run (`python -m grpo fit -c configs/demo_*.yaml`); this file
only chains them and says where the outputs are.
"""
from __future__ import annotations

import time
from pathlib import Path

from data.answers import exact_match
from data.offline_task import build_offline_task, summary
from data.types import MEMORY
from envs.search import LocalSearchEnv
from grpo.cli import main as cli

COLD_START = Path("results/cold_start/sft_adapter_hedge_all_714")
PUBLISHED = Path("results/economy/grpo_adapter")


def _phase(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


def side_by_side(adapters: dict[str, Path], examples, env, model_name: str | None = None) -> str:
    """One line per question and policy (greedy): searched or not, the answer, right or wrong."""
    from grpo.infer import answer, load_for_inference

    lines = []
    results = {}
    for label, path in adapters.items():
        model, tokenizer = load_for_inference(str(path), model_name)
        results[label] = [answer(model, tokenizer, env, ex.question, temperature=0.0) for ex in examples]
    width = max(map(len, adapters))
    for i, ex in enumerate(examples):
        lines.append(f"{ex.question}  [{ex.kind}; gold {ex.answers[0]}]")
        for label in adapters:
            r = results[label][i]
            mark = "right" if exact_match(r.answer or "", ex.answers) else "wrong"
            how = f"searched {', '.join(r.queries)}" if r.calls else "answered directly"
            lines.append(f"  {label:<{width}}  {how:<34} -> {r.answer!s:<22} {mark}")
    return "\n".join(lines)


def show_what_grpo_learned(n_per_kind: int = 4) -> None:
    if not (COLD_START.is_dir() and PUBLISHED.is_dir()):
        print(f"no published policy ({PUBLISHED} and {COLD_START}): skipped")
        return
    task = build_offline_task(seed=0)
    memory = [ex for ex in task.test if ex.kind == MEMORY][:n_per_kind]
    lookup = [ex for ex in task.test if ex.kind != MEMORY][:n_per_kind]
    print(side_by_side({"cold start": COLD_START, "GRPO": PUBLISHED}, memory + lookup, LocalSearchEnv(task.documents)))


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
