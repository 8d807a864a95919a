"""GRPO loss pieces against numbers worked out by hand. Shapes: N samples, C completion tokens."""
import math

import pytest
import torch

from grpo.losses import (Normaliser, clipped_policy_loss, group_advantages, grpo_loss, k3_kl,
                         masked_mean_per_sequence, masked_mean_tokens, split_groups, sum_losses)

# --------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed_and_zero_spread():
    # group 1 [1, 0, 0]: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    #   -> (2/3)/sqrt(1/3) = 1.1547, (-1/3)/sqrt(1/3) = -0.57735
    # group 2 [0.1, 0.1, 0.1]: zero spread -> exactly 0 (float mean of 0.1s is not exactly 0.1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    adv, zero = group_advantages(rewards, group_size=3, eps=0.0)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[:3], torch.tensor([2 / 3 / s, -1 / 3 / s, -1 / 3 / s], dtype=torch.float64))
    assert torch.equal(adv[3:], torch.zeros(3, dtype=torch.float64))
    assert zero.tolist() == [False, True] and int(zero.sum()) == 1


def test_group_advantages_uses_sample_std():
    # [1, 0]: mean 0.5, sample std sqrt(0.5) -> ±0.7071 (population std 0.5 would give ±1)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=0.0)
    assert torch.allclose(adv, torch.tensor([math.sqrt(0.5), -math.sqrt(0.5)]))


def test_group_advantages_eps():
    # [1, 0] with eps=1e-4: 0.5 / (sqrt(0.5) + 1e-4)
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    assert adv[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-4))


def test_split_groups_are_those_where_some_samples_search_and_some_do_not():
    # G = 4: [0 1 0 0] split; [2 1 1 1] all search; [0 0 0 0] none does; [0 3 3 3] split
    calls = torch.tensor([0, 1, 0, 0, 2, 1, 1, 1, 0, 0, 0, 0, 0, 3, 3, 3])
    assert split_groups(calls, 4).tolist() == [True, False, False, True]
    # only those where a sample without a call is right: group 0's sample 0, not group 3's sample 0
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert split_groups(calls, 4, correct).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="G=3"):
        split_groups(calls, 3)


def test_group_advantages_without_std_scaling():
    # Dr. GRPO: [1, 0, 0] - 1/3 = [2/3, -1/3, -1/3]; [5, 5, 5] -> 0
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 5.0, 5.0, 5.0]), 3, scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    assert zero.tolist() == [False, True]


def test_group_advantages_all_zero_spread_no_nan():
    adv, zero = group_advantages(torch.ones(4), group_size=2)
    assert torch.equal(adv, torch.zeros(4)) and zero.all()


def test_group_advantages_indivisible():
    with pytest.raises(ValueError, match="N=7.*G=2"):
        group_advantages(torch.zeros(7), group_size=2)

# --------------------------------------------------------------------------------------- k3 KL


def test_k3_hand_computed():
    # d = ref - logp. d = -1: e^-1 + 1 - 1 = 0.367879; d = 1: e - 1 - 1 = 0.718282; d = 0: 0
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[-1.0, 0.0, -2.0]])
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[math.exp(-1), math.e - 2, 0.0]]))


def test_k3_clamp():
    # d = 50 clamped to 10: e^10 - 10 - 1 = 22015.4658; d = -50 -> -10: e^-10 + 10 - 1 = 9.0000454
    kl = k3_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[50.0, -50.0]]), clamp=10.0)
    assert torch.allclose(kl, torch.tensor([[math.exp(10) - 11, math.exp(-10) + 9]]))
    assert (k3_kl(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()

# --------------------------------------------------------------------------------------- clipped loss


def _clip(logratio, adv, **kw):
    loss, clipped = clipped_policy_loss(torch.tensor([[logratio]]), torch.zeros(1, 1),
                                        torch.tensor([adv]), **kw)
    return loss.item(), clipped.item()


def test_clipped_policy_loss_cases():
    up, down = math.log(1.6), math.log(0.5)
    # A = +1, ratio 1.6 > 1.2: max(-1.6, -1.2) = -1.2, clipped
    assert _clip(up, 1.0) == (pytest.approx(-1.2), True)
    # A = +1, ratio 0.5 < 0.8: max(-0.5, -0.8) = -0.5, unclipped term active
    assert _clip(down, 1.0) == (pytest.approx(-0.5), False)
    # A = -1, ratio 0.5: max(0.5, 0.8) = 0.8, clipped
    assert _clip(down, -1.0) == (pytest.approx(0.8), True)
    # A = -1, ratio 1.6: max(1.6, 1.2) = 1.6, unclipped
    assert _clip(up, -1.0) == (pytest.approx(1.6), False)


def test_clip_eps_high():
    r = math.log(1.25)
    # eps = 0.2: ratio 1.25 clipped to 1.2 -> -1.2; clip-higher 0.28: 1.25 < 1.28 -> -1.25
    assert _clip(r, 1.0) == (pytest.approx(-1.2), True)
    assert _clip(r, 1.0, clip_eps_high=0.28) == (pytest.approx(-1.25), False)
    # the low side still uses clip_eps: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8
    assert _clip(math.log(0.5), -1.0, clip_eps_high=0.28) == (pytest.approx(0.8), True)


def test_clipped_tokens_have_no_gradient():
    logp = torch.tensor([[math.log(1.6), math.log(1.1)]], requires_grad=True)
    loss, clipped = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]))
    loss.sum().backward()
    # d(-A ratio)/dlogp = -ratio = -1.1 on the unclipped token; 0 on the clipped one
    assert clipped.tolist() == [[True, False]]
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1]]))

# --------------------------------------------------------------------------------------- aggregation

X = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])   # (N=2, C=4)
M = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])                   # lengths 4 and 1


def test_token_vs_sequence_aggregation_ragged():
    # token-level: (1+1+1+1 + 4) / 5 = 1.6;  per-sequence: (4/4 + 4/1) / 2 = 2.5
    assert masked_mean_tokens(X, M).item() == pytest.approx(1.6)
    assert masked_mean_per_sequence(X, M).item() == pytest.approx(2.5)
    # a third, empty sequence (all mask 0) is not counted: still (1 + 4) / 2 = 2.5
    x3, m3 = torch.cat([X, torch.full((1, 4), 7.0)]), torch.cat([M, torch.zeros(1, 4, dtype=M.dtype)])
    assert masked_mean_per_sequence(x3, m3).item() == pytest.approx(2.5)


def test_aggregation_all_zero_mask_is_zero():
    zero = torch.zeros_like(M)
    assert masked_mean_tokens(X, zero).item() == 0.0
    assert masked_mean_per_sequence(X, zero).item() == 0.0
    # masked inf/nan never leak in
    bad = X.clone()
    bad[1, 1:] = float("nan")
    assert masked_mean_tokens(bad, M).item() == pytest.approx(1.6)

# --------------------------------------------------------------------------------------- grpo_loss

LOGP = torch.zeros(2, 2)                                  # (N=2, C=2), μ = 1 so ratio = 1
REF = torch.tensor([[-1.0, 0.0], [0.0, 5.0]])             # k3: [[e^-1, 0], [0, masked]]
ADV = torch.tensor([1.0, -1.0])                           # (N,)
MASK = torch.tensor([[1, 1], [1, 0]])                     # 3 completion tokens


def test_grpo_loss_token_level_hand_computed():
    # pg per token = -A*1: [[-1, -1], [1, -]] -> mean over 3 tokens = -1/3
    # kl = (e^-1 + 0 + 0) / 3 = 0.122626; loss = -1/3 + 0.04 * 0.122626 = -0.328428
    out = grpo_loss(LOGP, None, REF, ADV, MASK, beta=0.04)
    assert out.policy_loss.item() == pytest.approx(-1 / 3)
    assert out.kl.item() == pytest.approx(math.exp(-1) / 3)
    assert out.loss.item() == pytest.approx(-1 / 3 + 0.04 * math.exp(-1) / 3)
    assert out.clip_frac.item() == 0.0 and out.ratio_mean.item() == 1.0  # μ = 1: clipping inert


def test_grpo_loss_sequence_level_hand_computed():
    # pg: ((-1 - 1)/2 + 1/1) / 2 = 0; kl: ((e^-1 + 0)/2 + 0/1) / 2 = e^-1/4 = 0.09197
    out = grpo_loss(LOGP, None, REF, ADV, MASK, beta=0.04, token_level=False)
    assert out.policy_loss.item() == pytest.approx(0.0)
    assert out.kl.item() == pytest.approx(math.exp(-1) / 4)
    assert out.loss.item() == pytest.approx(0.04 * math.exp(-1) / 4, abs=1e-7)  # float32


def test_grpo_loss_gradient_flows_only_through_logp():
    logp = LOGP.clone().requires_grad_()
    old, ref, adv = (t.clone().requires_grad_() for t in (LOGP, REF, ADV))
    grpo_loss(logp, old, ref, adv, MASK, beta=0.0).loss.backward()
    # beta = 0, ratio 1: d/dlogp of mean(-A ratio) over 3 tokens = -A/3 on completion tokens
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))
    assert old.grad is None and ref.grad is None and adv.grad is None


def test_grpo_loss_without_old_logp_is_the_plain_policy_gradient():
    # μ = 1 given as old_logp=None: π_old = π_θ.detach(), so ratio = 1 and d ratio/d logp = 1, the same
    # gradient -A/3 as above. Were π_old not detached, ratio = exp(logp - logp) would carry no gradient.
    logp = (LOGP - 0.7).requires_grad_()
    out = grpo_loss(logp, None, None, ADV, MASK, beta=0.0)
    out.loss.backward()
    assert out.ratio_mean.item() == 1.0
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))


@pytest.mark.parametrize("token_level", [True, False])
def test_masked_tokens_change_nothing(token_level):
    def run(fill):
        logp, old, ref = (t.clone() for t in (LOGP + 0.1, LOGP, REF))
        for t in (logp, old, ref):
            t[MASK == 0] = fill
        logp.requires_grad_()
        out = grpo_loss(logp, old, ref, ADV, MASK, beta=0.04, token_level=token_level)
        out.loss.backward()
        return out, logp.grad
    base, base_grad = run(0.0)
    for fill in (1e30, -1e30, float("inf"), float("nan")):
        out, grad = run(fill)
        for name in ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean"):
            assert torch.equal(getattr(out, name), getattr(base, name)), (fill, name)
        assert torch.equal(grad, base_grad) and grad[1, 1] == 0.0


def test_grpo_loss_clip_frac_counts_completion_tokens():
    # token (0,0) has ratio e^1 > 1.2 with A = +1 -> clipped; 1 of 3 completion tokens
    logp = torch.tensor([[1.0, 0.0], [0.0, 9.0]])
    out = grpo_loss(logp, torch.zeros(2, 2), None, ADV, MASK, beta=0.0)
    assert out.clip_frac.item() == pytest.approx(1 / 3)
    assert out.kl.item() == 0.0
    assert out.ratio_mean.item() == pytest.approx((math.e + 1 + 1) / 3)


def test_grpo_loss_requires_reference_when_beta_positive():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(LOGP, None, None, ADV, MASK, beta=0.04)


# --------------------------------------------------------------------------------------- micro-batches


def test_normaliser_counts_the_whole_batch():
    # MASK: 3 tokens in 2 sequences; an empty third row counts for neither
    norm = Normaliser.of(torch.cat([MASK, torch.zeros(1, 2, dtype=MASK.dtype)]))
    assert norm.tokens.item() == 3 and norm.sequences.item() == 2


@pytest.mark.parametrize("token_level", [True, False])
def test_micro_batch_losses_are_shares_of_the_batch_loss(token_level):
    """Rows 0 and 1 of the grpo_loss tests as two micro-batches, each with the batch's Normaliser (M = 3, N' = 2).
    Token level: pg row 0 (-1 - 1)/3 = -2/3, row 1 1/3; kl e^-1/3 and 0; ratio_mean 2/3 and 1/3.
    Per sequence: pg row 0 ((-1 - 1)/2)/2 = -1/2, row 1 (1/1)/2 = 1/2; kl (e^-1/2)/2 and 0.
    They add up to the one-pass values (loss, diagnostics, gradient); row 1 normalised by its own
    counts instead would weigh 1 (its one token) where its share is 1/3 (1/2 per sequence)."""
    norm = Normaliser.of(MASK)
    logp = LOGP.clone().requires_grad_()
    parts = [grpo_loss(logp[rows], None, REF[rows], ADV[rows], MASK[rows], beta=0.04, token_level=token_level,
                       normaliser=norm) for rows in (slice(0, 1), slice(1, 2))]
    if token_level:
        want_pg, want_kl = (-2 / 3, 1 / 3), (math.exp(-1) / 3, 0.0)
    else:
        want_pg, want_kl = (-1 / 2, 1 / 2), (math.exp(-1) / 4, 0.0)
    for part, pg, kl in zip(parts, want_pg, want_kl):
        assert part.policy_loss.item() == pytest.approx(pg) and part.kl.item() == pytest.approx(kl)
        assert part.loss.item() == pytest.approx(pg + 0.04 * kl)
    assert [p.ratio_mean.item() for p in parts] == pytest.approx([2 / 3, 1 / 3])
    total = sum_losses(parts)
    whole = grpo_loss(LOGP, None, REF, ADV, MASK, beta=0.04, token_level=token_level)
    for name in ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean"):
        assert getattr(total, name).item() == pytest.approx(getattr(whole, name).item()), name
    assert not total.loss.requires_grad
    grad_parts, = torch.autograd.grad(sum(p.loss for p in parts), logp)
    logp_whole = LOGP.clone().requires_grad_()
    grad_whole, = torch.autograd.grad(grpo_loss(logp_whole, None, REF, ADV, MASK, beta=0.04,
                                                token_level=token_level).loss, logp_whole)
    assert torch.allclose(grad_parts, grad_whole)
    own = grpo_loss(LOGP[1:], None, REF[1:], ADV[1:], MASK[1:], beta=0.04, token_level=token_level)
    assert own.policy_loss.item() == pytest.approx(1.0)  # its own count: not its share
