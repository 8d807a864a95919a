"""The fast loss pass (`completion_logprobs`) against the plain padded one, and its pure helpers.

The rollout is built by hand on the tiny Llama with LoRA: two prompts of different lengths
(left padding), G = 3 completions each of different lengths (right padding), observation
tokens inside completions (completion mask 0, attention 1), temperature 0.7. Log-probs and
the gradients of every LoRA parameter must match the padded pass to fp32 precision.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from grpo.logprobs import (SampledLogSoftmax, completion_logprobs, completion_logprobs_padded, group_micro_batches,
                           length_buckets, loss_micro_batches, sampled_token_logprobs)
from grpo.rollout import Rollout
from models.loading import add_lora, load_model_and_tokenizer, reference_policy

T = 0.7


def _policy(seed: int = 0):
    model, tok = load_model_and_tokenizer("tiny", seed=seed)
    policy = add_lora(model, r=4, alpha=8)
    with torch.no_grad(), torch.random.fork_rng():  # fresh LoRA has B = 0: give it weight, so both A and B get gradient
        torch.manual_seed(seed + 1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return policy.train(), tok


def _rollout(vocab: int, seed: int = 0) -> Rollout:
    """B = 2 prompts (5 and 9 tokens), G = 3 completions of lengths 7, 12, 3 / 10, 1, 12.

    Completion masks: a few observation tokens (0) inside some completions, 0 on padding.
    """
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (5,), generator=g), torch.randint(3, vocab, (9,), generator=g)]
    lengths = [7, 12, 3, 10, 1, 12]
    obs = {0: (2, 5), 1: (4, 9), 3: (1, 3), 5: (6, 11)}  # row -> [start, end) of an observation
    B, G, P, C = 2, 3, 9, 12
    N = B * G
    input_ids = torch.full((N, P + C), 2, dtype=torch.long)          # pad id 2 everywhere first
    attention = torch.zeros((N, P + C), dtype=torch.long)
    completion_mask = torch.zeros((N, C), dtype=torch.long)
    for n in range(N):
        p = prompts[n // G]
        input_ids[n, P - len(p):P] = p
        attention[n, P - len(p):P] = 1
        L = lengths[n]
        input_ids[n, P:P + L] = torch.randint(3, vocab, (L,), generator=g)
        attention[n, P:P + L] = 1
        completion_mask[n, :L] = 1
        if n in obs:
            completion_mask[n, obs[n][0]:obs[n][1]] = 0
    zeros = torch.zeros(N, dtype=torch.long)
    return Rollout(input_ids=input_ids, attention_mask=attention, completion_mask=completion_mask,
                   sample_logp=torch.zeros(completion_mask.shape), prompt_length=P,
                   group_ids=torch.arange(B).repeat_interleave(G), num_calls=zeros, num_calls_no_obs=zeros,
                   incomplete_calls=zeros, tool_errors=zeros, num_generated=completion_mask.sum(1),
                   truncated=zeros.bool(), texts=[""] * N, queries=[[] for _ in range(N)])


def _grads(policy, logp, mask, weights):
    policy.zero_grad(set_to_none=True)
    (logp * mask * weights).sum().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("forward_cost", [0, 4, 10_000])  # one bucket per length / a few / one bucket
def test_fast_logprobs_and_gradients_match_padded(forward_cost):
    policy, tok = _policy()
    ro = _rollout(len(tok))
    mask = ro.completion_mask.float()                                                  # (N, C)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))     # (N, C)

    slow = completion_logprobs_padded(policy, ro, T)                                   # (N, C)
    g_slow = _grads(policy, slow, mask, weights)
    fast = completion_logprobs(policy, ro, T, chunk=5, forward_cost=forward_cost)     # (N, C)
    g_fast = _grads(policy, fast, mask, weights)

    sampled = ro.completion_mask.bool()
    assert fast.shape == slow.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast[sampled], slow[sampled], atol=1e-5, rtol=1e-5)
    assert (fast[~sampled] == 0).all()                                     # observations and padding: 0
    assert g_fast.keys() == g_slow.keys() and len(g_fast) > 0
    for name in g_slow:
        assert g_slow[name].abs().max() > 0, name                          # the comparison is not vacuous
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fast_reference_pass_matches_padded_without_grad():
    """π_ref: the adapters disabled, no gradient (the reference pass of the module)."""
    policy, tok = _policy(seed=1)
    ro = _rollout(len(tok), seed=1)
    sampled = ro.completion_mask.bool()
    with torch.no_grad(), reference_policy(policy) as ref:
        slow, fast = completion_logprobs_padded(ref, ro, T), completion_logprobs(ref, ro, T, chunk=7)
    with torch.no_grad():
        with_lora = completion_logprobs(policy, ro, T)
    torch.testing.assert_close(fast[sampled], slow[sampled], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_lora[sampled], fast[sampled], atol=1e-3)  # the adapters did change the policy


def test_comparison_is_sensitive_to_temperature():
    """The test above can fail: the same pass at T = 1 differs from T = 0.7 well beyond its tolerance."""
    policy, tok = _policy()
    ro = _rollout(len(tok))
    sampled = ro.completion_mask.bool()
    with torch.no_grad():
        a, b = completion_logprobs(policy, ro, T), completion_logprobs_padded(policy, ro, 1.0)
    assert (a[sampled] - b[sampled]).abs().max() > 1e-3


def test_sampled_token_logprobs_by_hand():
    """Two positions, a 3-token vocabulary, identity head: log softmax(z / T)[y] written out."""
    head = torch.nn.Identity()
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 1])
    expected = torch.tensor([3 / 2 - torch.logsumexp(torch.tensor([0.5, 1.0, 1.5]), 0).item(), -torch.log(torch.tensor(3.0)).item()])
    torch.testing.assert_close(sampled_token_logprobs(head, z, y, temperature=2.0, chunk=1), expected)


def test_sampled_log_softmax_gradient_is_the_written_out_one():
    """The hand-written backward, (1[v = y] - softmax(z / T)) / T times the incoming gradient, against
    finite differences (fp64), and at T = 0.7 on the 3-token example: row 0, y = 2, incoming 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2])
    torch.autograd.gradcheck(lambda z: SampledLogSoftmax.apply(z, y, 0.7), (z,))
    z = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    SampledLogSoftmax.apply(z, torch.tensor([2]), 0.7).sum().backward()
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]) / 0.7, 0)
    torch.testing.assert_close(z.grad[0], (torch.tensor([0.0, 0.0, 1.0]) - p) / 0.7)


def test_sampled_log_softmax_keeps_bf16_logits_and_matches_fp32_autograd():
    """bf16 logits (as autocast's LM head gives them): fp32 values, a bf16 gradient equal to autograd's
    through fp32 log_softmax of the same logits, rounded to bf16; the logits themselves untouched."""
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(5, 50, generator=g)).bfloat16().requires_grad_()
    y, w = torch.randint(0, 50, (5,), generator=g), torch.randn(5, generator=g)
    before = z.detach().clone()
    out = SampledLogSoftmax.apply(z, y, 1.3)
    (out * w).sum().backward()
    z32 = z.detach().float().requires_grad_()
    ref = torch.log_softmax(z32 / 1.3, -1).gather(-1, y[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    assert out.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(z.grad, z32.grad.bfloat16())
    assert torch.equal(z.detach(), before)


def test_length_buckets_cover_rows_and_are_optimal():
    lengths = [7, 12, 3, 10, 1, 12, 0]
    for cost in (0, 4, 10_000):
        buckets = length_buckets(lengths, cost)
        rows = [n for b in buckets for n in b]
        assert sorted(rows) == [0, 1, 2, 3, 4, 5]                  # every non-empty row once; length 0 left out
        total = sum(cost + len(b) * max(lengths[n] for n in b) for b in buckets)
        # brute force over every split of the sorted rows into consecutive buckets
        order = sorted(rows, key=lambda n: lengths[n])
        best = min(sum(cost + len(order[a:b]) * lengths[order[b - 1]] for a, b in zip((0,) + cuts, cuts + (6,)))
                   for k in range(6) for cuts in itertools.combinations(range(1, 6), k))
        assert total == best
    assert length_buckets(lengths, 0) == [[4], [2], [0], [3], [1, 5]]   # no padding at all
    assert length_buckets(lengths, 10_000) == [[4, 2, 0, 3, 1, 5]]      # one bucket


def test_group_micro_batches_by_hand():
    """Greedy over consecutive groups: [5, 3 | 4 | 10 (over the budget: alone) | 1] with a budget of 8."""
    assert group_micro_batches([5, 3, 4, 10, 1], 8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert group_micro_batches([5, 3, 4], 100) == [range(0, 3)]
    assert group_micro_batches([], 8) == []


def test_loss_micro_batches_count_each_prompt_once_and_keep_groups_whole():
    """The hand-built rollout: group 0 feeds its 5-token prompt once + completions 7 + 12 + 3 = 27 tokens,
    group 1 9 + 10 + 1 + 12 = 32; together 59. The log-probs of the micro-batches are the batch's rows."""
    policy, tok = _policy()
    ro = _rollout(len(tok))
    assert [r.tolist() for r in loss_micro_batches(ro, 59)] == [[0, 1, 2, 3, 4, 5]]
    micro = loss_micro_batches(ro, 58)
    assert [r.tolist() for r in micro] == [[0, 1, 2], [3, 4, 5]]
    assert [r.tolist() for r in loss_micro_batches(ro, 1)] == [[0, 1, 2], [3, 4, 5]]
    with torch.no_grad():
        whole = completion_logprobs(policy, ro, T)                                   # (N, C)
        parts = torch.cat([completion_logprobs(policy, ro.select(rows), T) for rows in micro])
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-6)
