"""The GRPO loss as pure functions of tensors: advantages, k3 KL, clipped surrogate, masked means.

No model, no Lightning. Shapes (`grpo/__init__.py`): N = B*G samples, C completion tokens.

Objective (GRPO; Shao et al. 2024, DeepSeekMath §4.1, eq. 3), maximised:

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(r_it Â_i, clip(r_it, 1-ε_low, 1+ε_high) Â_i) - β KL_k3(i,t) ) ]
    r_it     = π_θ(o_it | q, o_i<t) / π_θold(o_it | q, o_i<t)
    Â_i      = (R_i - mean(R_group)) / (std(R_group) + eps)                   (§4.1.2)
    KL_k3    = π_ref/π_θ - log(π_ref/π_θ) - 1, per token                       (eq. 4)

Token-level variant (DAPO, Yu et al. 2025 §3.3): replace 1/G Σ_i 1/|o_i| Σ_t by
1/(Σ_i |o_i|) Σ_i Σ_t, so every token weighs the same. This is our default. (Dr. GRPO, Liu et
al. 2025 §3.1, names the length bias of 1/|o_i| and divides by a constant instead.)
The loss minimised is -J. Sums run over completion tokens only (completion_mask = 1): prompt,
tool observations and padding never reach the loss, the KL or any metric.

Micro-batches: a batch's loss can be computed (and back-propagated) a micro-batch of samples at a
time, with the denominators of the WHOLE batch (`Normaliser.of` its completion mask: M tokens, N'
sequences): each micro-batch's `grpo_loss` is then its share of the batch's, and the shares (loss,
gradient and every diagnostic) add up to the one-pass values (`sum_losses`). Normalising each
micro-batch by its own count instead would weigh its tokens by the size of their micro-batch
(PITFALLS; ms-swift #10117). ε_high (DAPO's clip-higher) defaults to ε.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Group-relative advantages (GRPO outcome supervision, DeepSeekMath §4.1.2).

        Â_i = (r_i - mean(r_group)) / (std(r_group) + eps)    if scale_by_std
        Â_i =  r_i - mean(r_group)                            otherwise (Dr. GRPO, Liu et al. 2025)

    rewards is (N,) with the G samples of each prompt consecutive. std is the SAMPLE std (Bessel,
    divide by G-1): torch.std's default and what TRL uses, so advantages match a TRL run with
    the same rewards (for G=2 and rewards {1, 0}: ±0.707, where the population std gives ±1).
    Groups whose rewards are all equal ("zero spread") get advantages exactly 0 (the mean of equal
    floats can differ from them by rounding) and are flagged in the returned (B,) mask.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards N={rewards.numel()} is not divisible by "
                         f"group_size G={group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()         # (N,)
    r = r.view(-1, group_size)                                               # (B, G)
    zero_spread = r.amax(dim=1) == r.amin(dim=1)                             # (B,)
    adv = r - r.mean(dim=1, keepdim=True)                                    # (B, G)
    if scale_by_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)                       # (B, G)
    adv = torch.where(zero_spread[:, None], torch.zeros_like(adv), adv)      # (B, G)
    return adv.reshape(-1), zero_spread                                      # (N,), (B,)


def split_groups(calls: Tensor, group_size: int, correct: Tensor | None = None) -> Tensor:
    """(B,) bool: the groups whose samples split between calling the tool and answering without a call.

    calls is (N,), each sample's tool calls (executed or not), the G samples of a prompt consecutive.
    In such a group the choice to search gets a gradient ∝ p(1 - p), p its share of searching samples;
    a group where every sample searches (or none does) teaches nothing about when to search. With
    correct ((N,) bool) only the split groups where some sample answered right without a call: those
    where the model knows something, so that answering directly can pay.
    """
    if calls.dim() != 1 or group_size < 1 or calls.numel() % group_size != 0:
        raise ValueError(f"calls of shape {tuple(calls.shape)} is not (B * G,) with G={group_size}")
    searched = (calls > 0).view(-1, group_size).sum(dim=1)                 # (B,)
    split = (searched > 0) & (searched < group_size)                       # (B,)
    if correct is not None:
        split &= (correct.to(calls.device) & (calls == 0)).view(-1, group_size).any(dim=1)
    return split                                                           # (B,)


# ---------------------------------------------------------------------------------------------
# Per-token terms


def k3_kl(logp: Tensor, ref_logp: Tensor, clamp: float = 10.0) -> Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref) (Schulman 2020, "Approximating KL divergence";
    DeepSeekMath eq. 4):

        d = clamp(ref_logp - logp, -clamp, +clamp);   k3 = exp(d) - d - 1  >= 0

    Unbiased for tokens sampled from π_θ, low variance, but exp(d) explodes for extreme
    log-ratios, hence the clamp (±10 as in verl and OpenRLHF). Shapes (N, C) -> (N, C).
    """
    d = (ref_logp - logp).clamp(-clamp, clamp)                               # (N, C)
    return torch.exp(d) - d - 1                                              # (N, C)


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float = 0.2,
                        clip_eps_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - ε_low, 1 + ε_high) * A)
              =  max(pg_loss1, pg_loss2),  pg_loss1 = -A ratio,  pg_loss2 = -A clip(ratio)

    ε_low = clip_eps; ε_high = clip_eps_high or clip_eps (DAPO's clip-higher, Yu et al. 2025 §3.1).
    Returns (loss (N, C), clipped (N, C) bool): clipped marks tokens where the clipped term is the
    active one (no gradient flows there), for loss/clip_frac.
    At μ = 1 (one update per rollout) old_logp == logp, the ratio is exactly 1 and clipping never
    triggers: that is expected, not a bug. advantages is (N,) or (N, C).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages       # (N, 1) or (N, C)
    ratio = torch.exp(logp - old_logp)                                       # (N, C)
    pg_loss1 = -adv * ratio                                                  # (N, C)
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)         # (N, C)
    return torch.maximum(pg_loss1, pg_loss2), pg_loss2 > pg_loss1            # (N, C), (N, C)


# ---------------------------------------------------------------------------------------------
# Aggregation over tokens


@dataclass(frozen=True)
class Normaliser:
    """The denominators of a batch's means, counted on its whole completion mask m (N, C):

        tokens     M  = Σ_i Σ_t m_it               (token-level loss, clip_frac, ratio_mean)
        sequences  N' = #{i : Σ_t m_it > 0}        (per-sequence loss)

    Given to `grpo_loss` with one micro-batch of the batch, it makes that micro-batch's loss its share
    of the batch's loss (see the module docstring)."""
    tokens: Tensor     # () M
    sequences: Tensor  # () N'

    @classmethod
    def of(cls, completion_mask: Tensor) -> "Normaliser":
        m = completion_mask.bool()                                           # (N, C)
        return cls(tokens=m.sum(), sequences=(m.sum(dim=1) > 0).sum())


def masked_mean_tokens(x: Tensor, mask: Tensor, tokens: Tensor | None = None) -> Tensor:
    """Token-level mean: Σ_i Σ_t m_it x_it / M, M = Σ_i Σ_t m_it (DAPO §3.3; avoids Dr. GRPO's length bias).

    Every completion token of the batch weighs the same. Masked values never enter, even inf or
    NaN ones. 0 when the mask is all zero. `tokens`: M of the whole batch when x, mask are one
    micro-batch of it (`Normaliser`), else this mask's own. x, mask (N, C) -> scalar.
    """
    m = mask.bool()                                                          # (N, C)
    total = torch.where(m, x, torch.zeros_like(x)).sum()                     # ()
    return total / (m.sum() if tokens is None else tokens).clamp(min=1)      # ()


def masked_mean_per_sequence(x: Tensor, mask: Tensor, sequences: Tensor | None = None) -> Tensor:
    """Sequence-level mean, the original GRPO: 1/N' Σ_i ( Σ_t m_it x_it / Σ_t m_it ).

    N' counts the sequences with at least one token (0 when the mask is all zero); `sequences`: N'
    of the whole batch when x, mask are one micro-batch of it (`Normaliser`), else this mask's own.
    Length bias (Dr. GRPO §3.1): a token of sequence i weighs 1/(N'|o_i|), so a long wrong answer
    (Â < 0) spreads its penalty thinly and is penalised less per token, while a short correct answer
    (Â > 0) gets a large per-token push: short correct answers are favoured and wrong answers
    drift longer. x, mask (N, C) -> scalar.
    """
    m = mask.bool()                                                          # (N, C)
    lengths = m.sum(dim=1)                                                   # (N,)
    per_seq = torch.where(m, x, torch.zeros_like(x)).sum(dim=1) / lengths.clamp(min=1)  # (N,)
    return per_seq.sum() / ((lengths > 0).sum() if sequences is None else sequences).clamp(min=1)  # ()


# ---------------------------------------------------------------------------------------------
# The loss


@dataclass
class GRPOLossOutput:
    """Loss and its diagnostics; all scalars, all but `loss` detached."""
    loss: Tensor        # -J, differentiable w.r.t. logp
    policy_loss: Tensor  # aggregated clipped surrogate (without the KL term)
    kl: Tensor          # aggregated k3 KL; 0 when no reference is given
    clip_frac: Tensor   # fraction of completion tokens where the clipped term is active
    ratio_mean: Tensor  # token mean of π_θ / π_θold


def grpo_loss(logp: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None, advantages: Tensor,
              completion_mask: Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
              beta: float = 0.04, token_level: bool = True, kl_clamp: float = 10.0,
              normaliser: Normaliser | None = None) -> GRPOLossOutput:
    """GRPO loss -J (see the module docstring) on completion tokens only.

    logp, old_logp, ref_logp, completion_mask: (N, C); advantages: (N,).
    old_logp=None means μ = 1: old_logp = logp.detach() (ratio 1; the gradient is the plain
    policy gradient -Â ∇logp). ref_logp may be None only when beta == 0; with beta == 0 and a reference given,
    the KL is still computed for logging but not added to the loss. Gradient flows through logp
    only: old_logp, ref_logp and advantages are detached. Masked positions are replaced by 0
    before any arithmetic, so any value there (even inf/NaN) changes neither loss nor gradients.
    token_level=True: token-level mean (DAPO/Dr. GRPO); False: per-sequence mean (original GRPO).
    policy_loss and kl use the same aggregation as the loss; clip_frac and ratio_mean are token means.
    normaliser: the denominators M and N' of the whole batch when these N rows are one micro-batch of
    it (every returned value is then this micro-batch's share: `sum_losses` adds them up); None: this
    batch's own (`Normaliser.of(completion_mask)`).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (pass beta=0 to train without a reference)")
    if logp.shape != completion_mask.shape or advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"shape mismatch: logp {tuple(logp.shape)}, completion_mask "
                         f"{tuple(completion_mask.shape)}, advantages {tuple(advantages.shape)}")
    mask = completion_mask.bool()                                            # (N, C)
    zeros = torch.zeros_like(logp)                                           # (N, C)
    logp = torch.where(mask, logp, zeros)                                    # (N, C)
    old = logp.detach() if old_logp is None else torch.where(mask, old_logp.detach(), zeros)  # (N, C)
    adv = advantages.detach()                                                # (N,)
    norm = Normaliser.of(mask) if normaliser is None else normaliser

    def aggregate(x: Tensor) -> Tensor:                                      # (N, C) -> ()
        if token_level:
            return masked_mean_tokens(x, mask, norm.tokens)
        return masked_mean_per_sequence(x, mask, norm.sequences)

    # 1. clipped surrogate
    pg_loss, clipped = clipped_policy_loss(logp, old, adv, clip_eps, clip_eps_high)  # (N, C), (N, C)
    per_token = pg_loss                                                      # (N, C)
    # 2. KL to the reference (k3), per token
    kl = zeros                                                               # (N, C)
    if ref_logp is not None:
        kl = k3_kl(logp, torch.where(mask, ref_logp.detach(), zeros), kl_clamp)  # (N, C)
        if beta > 0:
            per_token = per_token + beta * kl                                # (N, C)
    # 3. aggregate over completion tokens
    loss = aggregate(per_token)                                              # ()
    with torch.no_grad():
        ratio = torch.exp(logp - old)                                        # (N, C)
        return GRPOLossOutput(
            loss=loss,
            policy_loss=aggregate(pg_loss),
            kl=aggregate(kl),
            clip_frac=masked_mean_tokens(clipped.float(), mask, norm.tokens),
            ratio_mean=masked_mean_tokens(ratio, mask, norm.tokens),
        )


def sum_losses(parts: list[GRPOLossOutput]) -> GRPOLossOutput:
    """The batch's GRPOLossOutput from its micro-batches', each computed with the batch's `Normaliser`:
    every value is then a sum over the batch divided by a count of the whole batch, so the parts add
    up, field by field. The sum is detached (each part's loss has had its backward)."""
    return GRPOLossOutput(**{f.name: sum(getattr(p, f.name).detach() for p in parts) for f in fields(GRPOLossOutput)})
