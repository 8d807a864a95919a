"""Rollout speed of SmolLM2 on offline-task questions (B=2, G=8): this checkout's `grpo.rollout`
against an older checkout's, same model, prompts and seed, run one after the other in one process.

    git worktree add /tmp/rollout-old <commit>
    python benchmarks/rollout_speed.py --old /tmp/rollout-old [...] [--dtype bfloat16] [--threads 1]

Without an SFT adapter (`--adapter`) SmolLM2 writes no tags, so by default a nudge (`ToolNudge`)
raises the logits of "<" and "</" and completes "<call>", "</call>", "<answer>", "</answer>" from
the last token fed: rows call the search tool and stop at different steps, as in training. The
nudge looks only at each row's own last input token, so it acts the same whatever the batch.

`--merged` times this checkout's rollout twice more on the same policy, as `AgentModule.rollout` runs
it now: with the LoRA update merged into the weights (`models.lora.merged_lora`) against the peft
LoRA model (base + A + B matmuls per adapted Linear), alternating (lora, merged, merged, lora, ...),
same seed; prints the median time of each and their ratio, whether the sampled completions are the
same, and the largest gaps between the two runs' recorded log-probs and the loss pass's
(`completion_logprobs` on the LoRA model: the fp32 noise between two ways of computing them). The policy is SmolLM2 with the
SFT adapter merged in (`--adapter`) and a fresh LoRA (r 16) whose B is set to N(0, `--lora-noise`)
(a fresh B is 0, which would make the merge a no-op).

    python benchmarks/rollout_speed.py --merged --adapter PATH --threads 1 --repeats 3 [--batch-size 4]

Printed per implementation: wall time; forwards; decode forwards (one new token per row) and their
median time; mean rows per decode forward; positions fed after the prefill and the share of them
that are real tokens (the rest are masked padding).
"""
import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from data.datamodule import QADataModule
from envs.protocol import build_prompt
from models.loading import add_lora, load_model_and_tokenizer
from models.lora import merged_lora

LT, CLOSE_LT, CALL, ANSWER, GT = 44, 9617, 4350, 11247, 46  # SmolLM2 ids of "<", "</", "call", "answer", ">"


class ToolNudge(nn.Module):
    """SmolLM2 with tag logits nudged (see the module docstring); records every forward."""

    def __init__(self, model, nudge: bool = True):
        super().__init__()
        self.model, self.log, self.nudge = model, [], nudge
        self.config = model.config

    def forward(self, input_ids, attention_mask, **kwargs):
        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if not self.nudge:
            L = input_ids.shape[1]
            self.log.append((time.perf_counter() - t0, input_ids.shape[0], L, int(attention_mask[:, -L:].sum())))
            return out
        logits = out.logits                                                          # (R, 1, V)
        logits[:, -1, LT] += 4.0
        logits[:, -1, CLOSE_LT] += 2.0
        last = input_ids[:, -1]                                                      # (R,)
        logits[last == LT, -1, CALL] += 30.0
        logits[last == LT, -1, ANSWER] += 26.0
        logits[last == CLOSE_LT, -1, CALL] += 30.0
        logits[last == CLOSE_LT, -1, ANSWER] += 30.0
        logits[(last == CALL) | (last == ANSWER), -1, GT] += 40.0
        L = input_ids.shape[1]
        self.log.append((time.perf_counter() - t0, input_ids.shape[0], L, int(attention_mask[:, -L:].sum())))
        return out


def load_rollout(checkout: Path):
    """`rollout` of the checkout's grpo/rollout.py, with the checkout's own grpo/kvcache.py when it has one
    (the KV-cache batch left rollout.py for it), not this checkout's."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_{checkout.name}", checkout / "grpo" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    saved = sys.modules.get("grpo.kvcache")
    if (checkout / "grpo" / "kvcache.py").exists():
        sys.modules["grpo.kvcache"] = load("kvcache")  # what the checkout's `from grpo.kvcache import` finds
    try:
        return load("rollout").rollout
    finally:
        if saved is not None:
            sys.modules["grpo.kvcache"] = saved
        else:
            sys.modules.pop("grpo.kvcache", None)


def measure(name, rollout_fn, model, tok, prompts, env, args, merge: bool = False):
    model.log = []
    t0 = time.perf_counter()
    with merged_lora(model) if merge else contextlib.nullcontext(model) as policy:
        ro = rollout_fn(policy, tok, prompts, env, group_size=8, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed),
                        max_tool_wait=args.max_tool_wait)
    dt = time.perf_counter() - t0
    after_prefill = model.log[1:]
    decode = [(s, r) for s, r, L, _ in after_prefill if L == 1]
    fed = sum(r * L for _, r, L, _ in after_prefill)
    real = sum(n for *_, n in after_prefill)
    in_model = sum(s for s, *_ in model.log)
    print(f"{name:>12}: {dt:6.1f} s ({in_model:5.1f} in the model)  forwards {len(model.log):3d}  decode forwards {len(decode):3d}, "
          f"median {1000 * statistics.median(s for s, _ in decode):6.1f} ms, "
          f"{statistics.mean(r for _, r in decode):4.1f} rows  | positions fed {fed:5d}, real {real / fed:5.1%}  "
          f"| calls {int(ro.num_calls.sum())}, sampled {int(ro.num_generated.sum())}, "
          f"C {ro.completion_ids.shape[1]}", flush=True)
    ro.seconds = dt
    return ro


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", nargs="*", default=[], help="older checkouts (git worktrees) to compare with, oldest first")
    ap.add_argument("--adapter", default="outputs/sft_smollm2_adapter", help="SFT adapter (if it exists: no nudge)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-tool-wait", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=2, help="B questions (G = 8 each)")
    ap.add_argument("--merged", action="store_true", help="time the rollout with LoRA merged against the LoRA model")
    ap.add_argument("--lora-noise", type=float, default=1e-3, help="std of the fresh LoRA's B (with --merged)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dm = QADataModule(task="offline", batch_size=args.batch_size)
    dm.setup()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", dtype=args.dtype)
    adapter = Path(args.adapter).exists()
    if adapter or args.merged:
        torch.manual_seed(args.seed)  # the fresh LoRA's A (peft draws it from the global RNG)
        model = add_lora(model, init_adapter=args.adapter if adapter else None)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(args.seed)
            for name, p in model.named_parameters():
                if "lora_B" in name and args.merged:
                    p.normal_(0, args.lora_noise)
    model = ToolNudge(model.eval(), nudge=not adapter)
    prompts = [build_prompt(tok, q.question) for q in dm.train_set[:args.batch_size]]
    this = load_rollout(Path(__file__).resolve().parents[1])
    impls = [("new", this, False)]
    impls = [(Path(p).name, load_rollout(Path(p)), False) for p in args.old] + impls
    if args.merged:
        impls = [("lora", this, False), ("merged", this, True)]
    print(f"SmolLM2 {args.dtype}, B={args.batch_size}, G=8, max_new_tokens={args.max_new_tokens}, "
          f"max_tool_wait={args.max_tool_wait}, T={args.temperature}, threads {torch.get_num_threads()}, "
          f"adapter {args.adapter if adapter else None}, nudge {not adapter}")
    results, seconds = {}, {name: [] for name, *_ in impls}
    for r in range(args.repeats):
        for name, fn, merge in impls if r % 2 == 0 or not args.merged else impls[::-1]:  # --merged: ABBA order
            results[name] = measure(name, fn, model, tok, prompts, dm.search_env(), args, merge)
            seconds[name].append(results[name].seconds)
    if args.merged:
        lora, merged = results["lora"], results["merged"]
        t_lora, t_merged = statistics.median(seconds["lora"]), statistics.median(seconds["merged"])
        same = lora.texts == merged.texts and torch.equal(lora.input_ids, merged.input_ids)
        print(f"median over {args.repeats}: lora {t_lora:.1f} s, merged {t_merged:.1f} s, "
              f"merged/lora {t_merged / t_lora:.3f} (speed-up {t_lora / t_merged:.2f}x); same completions: {same}")
        if same:  # the yardstick: the same LoRA policy scored by the loss pass (another batch shape, another path)
            from grpo.logprobs import completion_logprobs

            mask = lora.completion_mask.bool()
            with torch.no_grad():
                scored = completion_logprobs(model.model, lora, args.temperature)
            gaps = {"lora/merged": lora.sample_logp - merged.sample_logp, "lora/loss pass": lora.sample_logp - scored,
                    "merged/loss pass": merged.sample_logp - scored}
            print(f"largest |log-prob gap| over {int(mask.sum())} sampled tokens: " + ", ".join(
                f"{k} {float(v[mask].abs().max()):.2e}" for k, v in gaps.items()))
    with torch.no_grad():  # the model alone: one decode forward of 8 rows over 200 cached tokens
        ids = torch.randint(0, 1000, (8, 200))
        cache = model.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        times = []
        for t in range(10):
            t0 = time.perf_counter()
            model.model(input_ids=ids[:, :1], attention_mask=torch.ones(8, 201 + t, dtype=torch.long),
                        position_ids=torch.full((8, 1), 200 + t), cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    print(f"model alone, 8 rows x 200 cached tokens: {1000 * statistics.median(times):.1f} ms per decode forward")
    for name, *_ in impls[:-1]:
        print(f"same completions {name}/{impls[-1][0]}: {results[name].texts == results[impls[-1][0]].texts}")
