"""The sampler/learner gap: how far the loss's log-probs (fp32, or bf16 autocast as `precision: bf16-mixed`
trains) are from the log-probs the rollout sampled with (fp32 decode, or bf16 with `--sampler-dtype
bfloat16`, as `model.rollout_dtype` decodes), on SmolLM2.

The rollout records log π_old(o_t) as it samples (`Rollout.sample_logp`) and the loss uses it as
π_old, so this gap enters the ratio π_θ/π_old and is clipped (PPO's clip, ε = 0.2) instead of being
ignored. This script measures it, with an fp32 learner for comparison (the two passes then differ
only by KV-cache vs. packed-forward rounding).

    python benchmarks/sampler_gap.py [--adapter outputs/sft_smollm2_adapter] [--prompts 4] [--group 8]
                                     [--sampler-dtype bfloat16]
"""
import argparse
from pathlib import Path

import torch

from data.datamodule import QADataModule
from envs.protocol import build_prompt
from grpo.logprobs import completion_logprobs
from grpo.rollout import rollout
from models.loading import DTYPES, add_lora, load_model_and_tokenizer, weights_in
from models.lora import merged_lora


def gap_stats(learner: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2) -> dict:
    """|Δ| = |log π_learner - log π_sampler| over sampled tokens, and the share the clip would cut."""
    d = (learner - sampler)[mask.bool()]                                       # (sampled tokens,)
    ratio = d.exp()
    return {"tokens": d.numel(), "mean_abs": d.abs().mean().item(), "p99_abs": d.abs().quantile(0.99).item(),
            "max_abs": d.abs().max().item(), "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item(),
            "clipped_frac": ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float().mean().item()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default="outputs/sft_smollm2_adapter")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--sampler-dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    dm = QADataModule(task="offline", batch_size=2)
    dm.setup()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    adapter = Path(args.adapter).exists()
    model = add_lora(model, init_adapter=args.adapter if adapter else None).eval()
    prompts = [build_prompt(tok, q.question) for q in dm.train_set[:args.prompts]]
    with merged_lora(model) as merged, weights_in(merged, DTYPES[args.sampler_dtype]):  # as the module decodes
        ro = rollout(merged, tok, prompts, dm.search_env(), group_size=args.group, max_new_tokens=args.max_new_tokens,
                     temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = completion_logprobs(model, ro, 1.0)                                 # (N, C)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = completion_logprobs(model, ro, 1.0)                             # (N, C)
    print(f"SmolLM2-135M-Instruct{' + ' + args.adapter if adapter else ' (no adapter)'}, {args.sampler_dtype} sampler: "
          f"{args.prompts} prompts x G={args.group}, T=1, calls {int(ro.num_calls.sum())}")
    for name, learner in (("fp32 learner", fp32), ("bf16-autocast learner", bf16)):
        s = gap_stats(learner, ro.sample_logp, ro.completion_mask)
        print(f"{name:>22}: " + "  ".join(f"{k}={v:.4g}" for k, v in s.items()))
