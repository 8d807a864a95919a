"""A training step of a config, old code beside new, in one invocation (issue #11's 4x target).

The old commit (default d5ae5e5, the tree when issue #11 was filed) is extracted beside this
checkout (`git archive`, into a temporary folder); both run `python -m grpo fit -c CONFIG` for a few
steps from the same SFT adapter, in turn (old, new, old, new, ...), each in its own process with
the same thread count. A small callback (`StepLog`, below) records every step's wall time, the
module's own `time/step_s` and `time/rollout_s`, the sampled tokens and tool calls per sample, and
the process's peak RSS. The first `--warmup` steps of each process are left out of the medians.

Each checkout runs its own config file: the old `configs/grpo_smollm2.yaml` trained under
bf16-mixed, the new one in fp32 (this CPU has no bf16 hardware); `--old-precision 32-true` runs the
old code in fp32 too, so that the ratio counts code changes alone (it needs > 14 GB). The same G, B
and token budget in both. Since 69dc5c6 the two codes sample different streams, so the work of a
step differs: the sampled tokens and calls per sample are printed beside the times (the "per
sampled token" ratio ignores observation tokens: read it as a rough figure only). Use more steps
and rounds to average the luck out.

    python benchmarks/step_old_vs_new.py --adapter outputs/sft_smollm2_adapter [--steps 4] [--rounds 2] [--new-bf16]
        [--old COMMIT --old-bf16]   # both in bf16 (an old commit that has model.rollout_dtype)

Last line: `speedup_vs_old: X.XX` (median old step / median new step).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
OLD = "d5ae5e5"
KEEP = ("time/step_s", "time/rollout_s")  # and every */tokens_per_sample, */calls_per_sample


class StepLog(Callback):
    """Appends one JSON line per training step to `path`: wall seconds, chosen logged values, peak RSS."""

    def __init__(self, path: str):
        self.path, self.t0 = path, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"wall_s": time.perf_counter() - self.t0,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        for key, value in trainer.callback_metrics.items():
            if key in KEEP or key.endswith("tokens_per_sample") or key.endswith("calls_per_sample"):
                row[key] = float(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(tree: Path, config: str, adapter: Path | None, steps: int, threads: int, extra: list[str], log: Path) -> list[dict]:
    """`python -m grpo fit` in `tree` for `steps` steps, its logs and checkpoints in a temporary folder
    (removed after); the StepLog rows it wrote."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    log.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="step_bench_") as out:
        cmd = [sys.executable, "-m", "grpo", "fit", "-c", config,
               *(["--model.init_adapter", str(adapter)] if adapter else []),
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(10 * steps),
               "--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out,
               "--trainer.callbacks+=step_old_vs_new.StepLog", f"--trainer.callbacks.path={log}", *extra]
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: `{' '.join(cmd)}` failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()]


def summary(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:]
    tokens = [r.get("rollout/tokens_per_sample", float("nan")) for r in timed]
    return {"step_s": statistics.median(r["wall_s"] for r in timed),
            "module_step_s": statistics.median(r.get("time/step_s", float("nan")) for r in timed),
            "rollout_s": statistics.median(r.get("time/rollout_s", float("nan")) for r in timed),
            "tokens_per_sample": statistics.median(tokens),
            "calls_per_sample": statistics.median(r.get("tools/calls_per_sample", float("nan")) for r in timed),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
            "steps_s": [round(r["wall_s"], 1) for r in timed]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=OLD, help="the old commit (default: %(default)s)")
    ap.add_argument("--config", default="configs/grpo_smollm2.yaml")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="the SFT adapter both start from (default: the config's own, e.g. none for configs/tiny.yaml)")
    ap.add_argument("--steps", type=int, default=4, help="steps per process (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each process not counted")
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--old-precision", default=None, help="e.g. 32-true (default: the old config's own)")
    ap.add_argument("--old-bf16", action="store_true",
                    help="the old code with --trainer.precision bf16-mixed --model.rollout_dtype bfloat16 too (old commits "
                         "that have model.rollout_dtype: a code-only ratio on a bf16 host)")
    ap.add_argument("--new-bf16", action="store_true",
                    help="the new code with --trainer.precision bf16-mixed --model.rollout_dtype bfloat16 (hosts with "
                         "bf16 hardware: AVX512_BF16, AMX)")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    adapter = args.adapter.resolve() if args.adapter else None
    if adapter and not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter {args.adapter}: no adapter_config.json there (train configs/sft_smollm2.yaml first)")

    with tempfile.TemporaryDirectory(prefix="grpo_old_") as tmp:
        old_tree = Path(tmp)
        archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        bf16 = ["--trainer.precision", "bf16-mixed", "--model.rollout_dtype", "bfloat16"]
        old_extra = bf16 if args.old_bf16 else ["--trainer.precision", args.old_precision] if args.old_precision else []
        log = Path(tmp) / "steps.jsonl"
        results = {"old": [], "new": []}
        for r in range(args.rounds):
            new_extra = bf16 if args.new_bf16 else []
            for name, tree, extra in (("old", old_tree, old_extra), ("new", ROOT, new_extra)):
                rows = run(tree, args.config, adapter, args.steps, args.threads, extra, log)
                results[name].append(summary(rows, args.warmup))
                print(f"round {r} {name}: {json.dumps(results[name][-1])}", flush=True)

    med = {name: {k: statistics.median(s[k] for s in runs) for k in ("step_s", "rollout_s", "tokens_per_sample")}
           | {"peak_rss_gib": max(s["peak_rss_gib"] for s in runs)} for name, runs in results.items()}
    for name in ("old", "new"):
        m = med[name]
        print(f"{name} ({args.old if name == 'old' else 'this checkout'}): step {m['step_s']:.2f} s, "
              f"rollout {m['rollout_s']:.2f} s, {m['tokens_per_sample']:.1f} sampled tokens per sample, "
              f"peak RSS {m['peak_rss_gib']:.2f} GiB")
    per_token = (med["old"]["step_s"] / med["old"]["tokens_per_sample"]) / (med["new"]["step_s"] / med["new"]["tokens_per_sample"])
    print(f"per sampled token: {per_token:.2f}x")
    print(f"speedup_vs_old: {med['old']['step_s'] / med['new']['step_s']:.2f}")


if __name__ == "__main__":
    main()
