"""Seconds per GRPO step: ours (`GRPOModule`) against TRL's `GRPOTrainer`, on the same work.

Both sides get the same model (SmolLM2-135M-Instruct, the cached HF folder of
`models.loading.smollm2_path()`), the same prompts (offline-task questions in our chat prompt), the
same B prompts x G completions per step, the same number of new tokens per completion, the
same precision, LoRA (r 16, α 32, no dropout, the same seven projections), β = 0.04, μ = 1,
T = 1, top-p 1, lr 2e-5, gradient clipping at 1, no gradient checkpointing, and the same reward
(`grpo.rewards.voi_reward` of the judged text, no tool calls). Tools are off on both sides.

Equal work, whatever is sampled. Every completion is exactly `--max-new-tokens` long:
  * TRL: `generation_kwargs={"min_new_tokens": n}` (generate masks EOS until n tokens).
  * ours: a benchmark-only monkeypatch (below, `equal_work_patches`): the rollout's stop set
    gets an id that never occurs instead of EOS, and the `</answer>` / `</call>` patterns
    never match, so no sample stops early and no tool turn happens. An EOS that is sampled
    is then just another token. Nothing in `grpo/` is changed.

The two runs go back to back in one process, each after one warm-up step (not timed); the
median of `--steps` timed steps is printed for each, then their ratio. Last line:
`speedup_vs_trl: X.XX` (TRL's median / ours; > 1 means we are faster).

    pip install -e .[bench]                                       # TRL (benchmark-only extra)
    python benchmarks/bench_vs_trl.py                             # fp32
    python benchmarks/bench_vs_trl.py --dtype bf16                # bf16-mixed on both sides (ours decodes
                                                                  # a bf16 copy: model.rollout_dtype)
    python benchmarks/bench_vs_trl.py --batch-size 2 --steps 5    # B = 2, as configs/grpo_smollm2.yaml
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import torch  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.0,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR, BETA, TEMPERATURE, MAX_GRAD_NORM = 2e-5, 0.04, 1.0, 1.0


def require_trl() -> None:
    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed; it is a benchmark-only extra:\n    pip install -e .[bench]\n"
                 "(or: pip install trl==1.16.0)")


def questions(n: int):
    """The first n training questions of the offline task (same order for both sides) and its search env."""
    from data.datamodule import QADataModule
    dm = QADataModule(task="offline", batch_size=1)
    dm.setup("fit")
    return list(dm.train_set[:n]), dm.search_env()


# ----------------------------------------------------------------------------- ours
class _NoEOS:
    """Benchmark-only: a tokenizer whose `eos_token_id` never occurs, so the rollout's stop set
    ({eos_token_id}) never fires. Everything else is the real tokenizer."""
    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):  # dunder methods are not looked up through __getattr__
        return len(self._tokenizer)


def equal_work_patches() -> None:
    """Benchmark-only monkeypatch of `grpo.rollout`: `</answer>` and `</call>` never match, so every
    completion runs to the token budget and no tool turn happens (TRL runs no tools)."""
    import grpo.rollout
    never = re.compile(r"(?!)")
    grpo.rollout.ANSWER_CLOSE = never
    grpo.rollout.CALL_CLOSE = never


def run_ours(examples, env, args) -> dict[str, list[float]]:
    import lightning as L
    from torch.utils.data import DataLoader

    from grpo.module import GRPOModule

    equal_work_patches()

    class Module(GRPOModule):
        def check_cold_start(self):
            pass  # speed, not learning: the raw model (no tags) is the same work for both sides

        def configure_model(self):
            super().configure_model()
            if not isinstance(self.tokenizer, _NoEOS):
                self.tokenizer = _NoEOS(self.tokenizer)

    class Timer(L.Callback):
        def __init__(self):
            self.step, self.rollout, self.tokens = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.step.append(time.perf_counter() - self.t0)
            self.rollout.append(float(trainer.callback_metrics["time/rollout_s"]))
            self.tokens.append(int(outputs["rollout"].completion_mask.sum()))

    module = Module(model_name="smollm2-135m-instruct", group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens, max_tool_calls=0, temperature=TEMPERATURE,
                    beta=BETA, lr=LR, warmup_ratio=0.0, max_grad_norm=MAX_GRAD_NORM, lora_r=LORA["r"],
                    lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_targets=tuple(LORA["targets"]),
                    rollout_dtype="bfloat16" if args.dtype == "bf16" else None)  # bf16: decode a bf16 copy
    module.env = env
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed" if args.dtype == "bf16" else "32-true",
                        max_steps=1 + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    loader = DataLoader(examples, batch_size=args.batch_size, collate_fn=list, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    assert all(t == args.batch_size * args.group_size * args.max_new_tokens for t in timer.tokens), timer.tokens
    return {"step": timer.step[1:], "rollout": timer.rollout[1:]}


# ----------------------------------------------------------------------------- TRL
def run_trl(examples, args) -> dict[str, list[float]]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from envs.protocol import build_prompt
    from grpo.rewards import judge, voi_reward
    from models.loading import smollm2_path

    from transformers import AutoTokenizer
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # the same prompt text as ours (already in the chat template: TRL uses a string prompt as it is)
    data = Dataset.from_list([{"prompt": build_prompt(tokenizer, ex.question), "answers": list(ex.answers)}
                              for ex in examples])

    def reward(completions, answers, **kwargs):
        return [voi_reward(*judge(c, a), 0, 0)["total"] for c, a in zip(completions, answers)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.step = []

        def on_step_begin(self, args_, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.step.append(time.perf_counter() - self.t0)

    class Trainer(GRPOTrainer):  # times generation + scoring (rewards, π_ref log-probs), TRL's "rollout"
        rollout_s: list[float] = []

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.rollout_s.append(time.perf_counter() - t0)
            return out

    B, G = args.batch_size, args.group_size
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=args.dtype == "bf16", fp16=False,
            model_init_kwargs={"dtype": torch.float32},
            per_device_train_batch_size=B * G, num_generations=G, gradient_accumulation_steps=1,
            max_completion_length=args.max_new_tokens,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},  # EOS ignored: equal work
            temperature=TEMPERATURE, top_p=1.0, beta=BETA, num_iterations=1, loss_type="grpo",
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM,
            gradient_checkpointing=False, shuffle_dataset=False, max_steps=1 + args.steps,
            logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["targets"], task_type="CAUSAL_LM")
        timer = Timer()
        trainer = Trainer(model=path, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        trainer.train()
    return {"step": timer.step[1:], "rollout": Trainer.rollout_s[1:]}


# ----------------------------------------------------------------------------- main
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fp32 on both sides, or bf16 mixed precision (autocast) on both sides")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--batch-size", type=int, default=1, help="B, prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per completion (exactly)")
    ap.add_argument("--only", choices=("ours", "trl"), default=None, help="run one side only")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's). On a shared 2-core machine 1 thread is steadier: with 2, "
                         "every op waits for a descheduled OpenMP worker while another process holds a core")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only != "ours":
        require_trl()
    torch.manual_seed(0)
    examples, env = questions((1 + args.steps) * args.batch_size)
    print(f"B={args.batch_size} G={args.group_size} new tokens={args.max_new_tokens} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} steps={args.steps} (+1 warm-up) load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for side, run in (("ours", lambda: run_ours(examples, env, args)), ("trl", lambda: run_trl(examples, args))):
        if args.only in (None, side):
            results[side] = run()
            med = {k: statistics.median(v) for k, v in results[side].items()}
            print(f"{side}: step median {med['step']:.2f} s (steps {', '.join(f'{t:.1f}' for t in results[side]['step'])}); "
                  f"{'rollout' if side == 'ours' else 'generate + score (incl. reference pass)'} median {med['rollout']:.2f} s", flush=True)
    if len(results) == 2:
        ours, trl = (statistics.median(results[s]["step"]) for s in ("ours", "trl"))
        print(f"TRL / ours = {trl:.2f} / {ours:.2f} s")
        print(f"speedup_vs_trl: {trl / ours:.2f}")
