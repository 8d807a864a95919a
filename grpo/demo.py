"""`make demo`: the whole offline pipeline on CPU, SmolLM2-135M-Instruct, ~20 minutes.

    0. the offline task: counts per kind and split (GeoNames data, no download)
    1. cold start: SFT on synthetic traces, so the model speaks the tag format
    2. GRPO from the SFT adapter, evaluated every 4 steps (Pareto plot + report)
    3. validate the last checkpoint

Each phase is an ordinary CLI run (`python -m grpo fit -c configs/demo_*.yaml`); this file
only chains them and says where the outputs are.
"""
from __future__ import annotations

import time
from pathlib import Path

from data.offline_task import build_offline_task, summary
from grpo.cli import main as cli


def _phase(title: str) -> float:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)
    return time.perf_counter()


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


if __name__ == "__main__":
    main()
