"""Why does our rollout decode SmolLM2 slower in bf16 than in fp32, when HF `generate` is faster in bf16?

Same batch for every variant: 2 offline questions x G copies (N rows, left-padded prompts), a
fixed number of decode steps. Variants, fp32 and bf16 weights each:

    generate      HF `model.generate` (min_new_tokens = max_new_tokens, so no row stops)
    loop          a minimal KV-cache decode loop: one `model(...)` per step with a 2-D attention mask
    loop-nomask   the same without an attention mask (only right when no prompt is padded)
    loop-posids   the loop with explicit position ids (what our rollout passes)
    rollout       `grpo.rollout.rollout` itself (tags never match: see bench_vs_trl.equal_work_patches)
    +lora         the rollout on a peft LoRA model (as GRPOModule decodes)

Then `--profile` prints the top ops (self CPU time) of a few decode steps of the rollout, fp32
against bf16.

    python benchmarks/decode_dtype.py [--steps 32] [--group-size 8] [--threads 1] [--profile]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


class _NoEOS:
    eos_token_id = -1

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def loop(model, ids, mask, steps, use_mask=True, posids=False):
    """Prefill + `steps` greedy decode steps with the KV cache; returns seconds of the decode steps."""
    from grpo.kvcache import position_ids_from_mask
    kw = {"attention_mask": mask} if use_mask else {}
    if posids:
        kw["position_ids"] = position_ids_from_mask(mask)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        kw = {"attention_mask": mask} if use_mask else {}
        if posids:
            kw["position_ids"] = position_ids_from_mask(mask)[:, -1:]
        out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1, **kw)
        cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated variants")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import grpo.rollout
    from data.datamodule import QADataModule
    from envs.protocol import build_prompt
    from grpo.kvcache import left_pad
    from grpo.rollout import rollout
    from models.loading import add_lora, load_model_and_tokenizer

    never = re.compile(r"(?!)")
    grpo.rollout.ANSWER_CLOSE = grpo.rollout.CALL_CLOSE = never  # benchmark only: no row stops, no tool turn
    dm = QADataModule(task="offline", batch_size=2)
    dm.setup()
    env = dm.search_env()
    qs = dm.train_set[:2]
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, N = {2 * args.group_size} rows, "
          f"{args.steps} decode steps", flush=True)
    only = set(args.only.split(",")) if args.only else None
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model_and_tokenizer("smollm2-135m-instruct", dtype=dtype)
        model.eval()
        prompts = [build_prompt(tok, q.question) for q in qs]
        enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
        ids, mask = left_pad(enc, tok.pad_token_id)
        ids, mask = ids.repeat_interleave(args.group_size, 0), mask.repeat_interleave(args.group_size, 0)
        N = ids.shape[0]
        res = {}
        with torch.no_grad():
            def run(name, fn):
                if only and name not in only:
                    return
                fn()  # warm-up
                t = fn()
                res[name] = t
                print(f"  {dtype:9s} {name:12s} {t:6.2f} s  {N * args.steps / t:6.0f} tok/s  "
                      f"{1000 * t / args.steps:6.1f} ms/step", flush=True)

            def gen():
                t0 = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.steps + 1,
                               min_new_tokens=args.steps + 1, do_sample=False, pad_token_id=tok.pad_token_id)
                return time.perf_counter() - t0  # includes one prefill
            run("generate", gen)
            run("loop", lambda: loop(model, ids, mask, args.steps))
            run("loop-nomask", lambda: loop(model, ids, mask, args.steps, use_mask=False))
            run("loop-posids", lambda: loop(model, ids, mask, args.steps, posids=True))

            def ours(m):
                t0 = time.perf_counter()
                rollout(m, _NoEOS(tok), prompts, env, args.group_size, args.steps + 1, 1.0,
                        generator=torch.Generator().manual_seed(0))
                return time.perf_counter() - t0  # includes one prefill
            run("rollout", lambda: ours(model))
            lora = add_lora(model).eval() if not only or "+lora" in only else None
            if lora is not None:
                run("+lora", lambda: ours(lora))
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                m = lora if lora is not None else model
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    ours(m)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
        del model
