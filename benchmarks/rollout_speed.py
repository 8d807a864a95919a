"""Rollout time of SmolLM2 (with the SFT adapter if it exists) on offline questions, G=8, B=2,
with tool turns fed at once (max_tool_wait=0) or batched across rows (the default, 8).

    python benchmarks/rollout_speed.py [--adapter outputs/sft_smollm2_adapter]
"""
import argparse
import time
from pathlib import Path

import torch

from data.datamodule import QADataModule
from grpo.models import add_lora, load_model_and_tokenizer
from grpo.prompts import build_prompt
from grpo.rollout import rollout

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="outputs/sft_smollm2_adapter")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    dm = QADataModule(task="offline", batch_size=2)
    dm.setup()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    if Path(args.adapter).exists():
        model = add_lora(model, init_adapter=args.adapter)
    model.eval()
    prompts = [build_prompt(tok, q.question) for q in dm.train_set[:2]]
    for wait in (0, 8):
        forwards = []
        hook = model.register_forward_pre_hook(lambda m, a, k: forwards.append(k["input_ids"].shape), with_kwargs=True)
        t0 = time.perf_counter()
        ro = rollout(model, tok, prompts, dm.search_env(), group_size=8, max_new_tokens=args.max_new_tokens,
                     generator=torch.Generator().manual_seed(0), max_tool_wait=wait)
        dt = time.perf_counter() - t0
        hook.remove()
        turns = sum(1 for s in forwards[1:] if s[1] > 1)
        print(f"max_tool_wait={wait}: {dt:.1f} s, {len(forwards)} forwards ({turns} with observations), "
              f"calls {ro.num_calls.sum().item()}, sampled tokens {ro.num_generated.sum().item()}, "
              f"completion length {ro.completion_ids.shape[1]}")
