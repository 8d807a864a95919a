"""Every metric the project logs, as pure functions; the table below is each one's formula.

Notation: over the N samples of a training step (sample n answers question n // G) or the n
questions of an evaluation; calls_n executed tool calls, no_obs_n calls not run (refused over the
budget, or never closed), sampled_n tokens sampled by the policy (observations not counted),
correct_n the answer exact-matches a gold answer (`grpo.rewards.judge`, the same for the VOI and
the OTC reward), m the completion mask (1 on sampled tokens).

Training: one value per step, means over the batch (`step_metrics`). `GRPOModule` logs them with
sync_dist: the mean over ranks, which is the mean over the global batch since every rank holds N
samples. Token means (loss/clip_frac, loss/ratio_mean) are multiplied by the rank's token share
M_r·W/M first, so that their mean over ranks is the token mean of the global batch; the loss terms
by the loss's own DDP factor (that share for the token-level loss, 1 for per-sequence means); the std
is a mean of per-rank values. With μ > 1 updates per rollout, every loss/ value is the last update's.

    loss/policy                clipped surrogate -min(ρÂ, clip(ρ, 1-ε, 1+ε_high)Â), aggregated as the loss
    loss/kl                    k3 KL exp(ref - logp) - (ref - logp) - 1, aggregated as the loss
    loss/total                 loss/policy + β·loss/kl
    loss/clip_frac             Σ m·[clipped term active] / Σ m
    loss/ratio_mean            Σ m·ρ / Σ m, ρ = π_θ/π_old at the last of the μ updates
    reward/mean, reward/std    mean and (sample) std of the N total rewards
    reward/<component>         mean of each reward term (VOI: correct, format, tool_cost, no_obs_penalty,
                               direct_bonus, guess_penalty, ungrounded_penalty; OTC: correct, format,
                               tool_factor)
    reward/frac_zero_std       #{groups whose G rewards are all equal} / B   (they teach nothing)
    tools/calls_per_sample     Σ calls_n / N
    tools/no_obs_per_sample    Σ no_obs_n / N
    tools/errors_per_sample    Σ tool errors_n / N   (executed calls whose tool raised)
    rollout/tokens_per_sample  Σ sampled_n / N
    rollout/truncated_frac     #{n stopped by the token budget} / N
    time/rollout_s, time/step_s  wall time of the rollout and of the whole step (added by the module)

Training, ratios of sums over the step, overall and per question kind (`step_sums`, `tool_metrics`).
`callbacks.metrics.ToolMetrics` adds the sums over ranks before dividing, so every ratio is that of
the global batch (a mean of per-rank ratios would not be); a ratio with a zero denominator is not
logged (no productivity in a step without calls, nothing for a kind absent from the batch).

    tools/search_rate                #{n : calls_n >= 1} / N
    tools/incomplete_per_sample      Σ incomplete_n / N   (`<call>` never closed)
    tools/productivity               Σ correct_n / Σ calls_n   (OTC's tool productivity, arXiv 2504.14870 §4)
    tools/<kind>/calls_per_sample    Σ calls_n / N_kind, over the samples of one kind (memory, lookup)
    tools/<kind>/search_rate         #{n of the kind : calls_n >= 1} / N_kind
    tools/<kind>/productivity        Σ correct_n / Σ calls_n over the kind
    rollout/<kind>/tokens_per_sample Σ sampled_n / N_kind
    reward/<kind>/mean               Σ r_n / N_kind

Evaluation (`grpo.evaluation`): one row per question, the eval/… metrics from the same sums and
`rates`, overall and per kind; the table is in that module's docstring.

SFT (`grpo.sft.SFTModule`): sft/loss, the cross-entropy on the assistant's own tokens, and
sft/tokens_per_batch, the number of those tokens.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from data.types import KINDS
from grpo.losses import GRPOLossOutput
from grpo.rollout import Rollout

QUANTITIES = ("samples", "correct", "f1", "well_formed", "calls", "searched", "incomplete", "tokens", "reward",
              "wrong_direct", "misread")
GROUPS = ("all", *KINDS)

# ---------------------------------------------------------------------------------------------
# Training: per-step means


def step_metrics(ro: Rollout, rewards: Tensor, components: Mapping[str, Tensor], zero_std: Tensor,
                 out: GRPOLossOutput, token_scale: Tensor | float = 1.0,
                 token_share: Tensor | float = 1.0) -> dict[str, Tensor]:
    """The loss/, reward/, tools/ and rollout/ means of one step (see the table). rewards (N,),
    components {k: (N,)}, zero_std (B,) bool; the loss terms (loss/policy, loss/kl, loss/total) ×
    token_scale (the loss's DDP factor), the token means (clip_frac, ratio_mean) × token_share (M_r·W/M)."""
    sampled = ro.completion_mask.sum(1).float()                                          # (N,)
    return {
        "loss/policy": out.policy_loss * token_scale, "loss/kl": out.kl * token_scale,
        "loss/total": out.loss.detach() * token_scale,
        "loss/clip_frac": out.clip_frac * token_share, "loss/ratio_mean": out.ratio_mean * token_share,
        "reward/mean": rewards.mean(), "reward/std": rewards.std(),
        "reward/frac_zero_std": zero_std.float().mean(),
        **{f"reward/{k}": v.mean() for k, v in components.items()},
        "tools/calls_per_sample": ro.num_calls.float().mean(),
        "tools/no_obs_per_sample": ro.num_calls_no_obs.float().mean(),
        "tools/errors_per_sample": ro.tool_errors.float().mean(),
        "rollout/tokens_per_sample": sampled.mean(),
        "rollout/truncated_frac": ro.truncated.float().mean(),
    }

# ---------------------------------------------------------------------------------------------
# Sums per question kind, and the ratios they give (training and evaluation alike)


def sums_by_kind(kinds: Sequence[str], values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """{group: {quantity: Σ over the samples of the group}} for group in GROUPS ("all", then each kind).

    kinds[n] is sample n's question kind; values maps quantities (of QUANTITIES) to one number per
    sample; "samples" counts the samples and a quantity not given sums to 0."""
    sums = {g: dict.fromkeys(QUANTITIES, 0.0) for g in GROUPS}
    for n, kind in enumerate(kinds):
        for g in ("all", kind):
            sums[g]["samples"] += 1.0
            for q, v in values.items():
                sums[g][q] += float(v[n])
    return sums


def rates(s: Mapping[str, float]) -> dict[str, float]:
    """Per-sample means of one group's sums, and the two ratios of sums, each left out when its
    denominator is 0: productivity = Σ correct / Σ calls, cost_of_pass = Σ tokens / Σ correct."""
    n = s["samples"]
    out = {"em": s["correct"] / n, "f1": s["f1"] / n, "well_formed": s["well_formed"] / n,
           "calls_per_sample": s["calls"] / n, "search_rate": s["searched"] / n,
           "tokens_per_sample": s["tokens"] / n, "incomplete_per_sample": s["incomplete"] / n,
           "reward_mean": s["reward"] / n, "wrong_direct_rate": s["wrong_direct"] / n,
           "misread_rate": s["misread"] / n}
    if s["calls"] > 0:
        out["productivity"] = s["correct"] / s["calls"]
    if s["correct"] > 0:
        out["cost_of_pass"] = s["tokens"] / s["correct"]
    return out


def step_sums(ro: Rollout, kinds: Sequence[str], correct: Tensor,
              rewards: Tensor | None = None) -> dict[str, dict[str, float]]:
    """`sums_by_kind` of one training step: kinds[n] and correct[n] (N,) bool of sample n, rewards (N,)."""
    if len(kinds) != len(ro.texts) or len(correct) != len(ro.texts):
        raise ValueError(f"rollout has {len(ro.texts)} completions, but {len(kinds)} kinds and "
                         f"{len(correct)} correctness values")
    return sums_by_kind(kinds, {
        "calls": ro.num_calls, "searched": ro.num_calls > 0, "incomplete": ro.incomplete_calls,
        "tokens": ro.completion_mask.sum(1), "correct": correct,                          # (N,) each
        **({} if rewards is None else {"reward": rewards})})


def tool_metrics(sums: Mapping[str, Mapping[str, float]], with_reward: bool = True) -> dict[str, float]:
    """The tools/…, rollout/<kind>/… and reward/<kind>/… ratios of a step's sums (see the table)."""
    overall = rates(sums["all"])
    out = {"tools/search_rate": overall["search_rate"], "tools/incomplete_per_sample": overall["incomplete_per_sample"]}
    if "productivity" in overall:
        out["tools/productivity"] = overall["productivity"]
    for kind in KINDS:
        if sums[kind]["samples"] == 0:
            continue
        r = rates(sums[kind])
        out[f"tools/{kind}/calls_per_sample"] = r["calls_per_sample"]
        out[f"tools/{kind}/search_rate"] = r["search_rate"]
        out[f"rollout/{kind}/tokens_per_sample"] = r["tokens_per_sample"]
        if with_reward:
            out[f"reward/{kind}/mean"] = r["reward_mean"]
        if "productivity" in r:
            out[f"tools/{kind}/productivity"] = r["productivity"]
    return out
