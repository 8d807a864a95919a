"""models.frozen_casts: under bf16 autocast the loss passes compute the same log-probs and LoRA gradients,
bit for bit, with the frozen weights cast once as with autocast casting them at every call; only frozen
fp32 `nn.Linear`s are given a cast copy; nothing changes without autocast; forwards given back on exit."""
import contextlib

import pytest
import torch
from torch import nn

from grpo.logprobs import completion_logprobs
from models.frozen_casts import _CastForward, frozen_casts
from models.loading import frozen_copy, load_model_and_tokenizer, reference_policy
from tests.test_logprobs import T, _grads, _policy, _rollout


def cast_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CastForward)]


@contextlib.contextmanager
def own_forwards(model):
    """Every module of `model` with its class's forward for the block (instance forwards set aside)."""
    saved = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__}
    try:
        yield model
    finally:
        for m, forward in saved.items():
            m.forward = forward


def test_lora_logprobs_and_gradients_are_bit_identical_under_bf16_autocast():
    policy, tok = _policy()
    ro = _rollout(len(tok))
    mask = ro.completion_mask.float()
    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):                 # as Lightning's
        plain = completion_logprobs(policy, ro, T)                                          # (N, C)
        plain_grads = _grads(policy, plain, mask, weights)
        with torch.no_grad(), reference_policy(policy) as ref:
            plain_ref = completion_logprobs(ref, ro, T)
        with frozen_casts(policy, None):
            frozen = [m.base_layer for m in policy.modules() if hasattr(m, "base_layer")] + [policy.lm_head]
            assert set(cast_modules(policy)) == set(frozen) and len(frozen) == 7 * 2 + 1  # 2 layers + LM head
            assert all(m.__dict__["forward"].weight.dtype == torch.bfloat16 for m in frozen)
            fast = completion_logprobs(policy, ro, T)
            fast_grads = _grads(policy, fast, mask, weights)
            with torch.no_grad(), reference_policy(policy) as ref:
                fast_ref = completion_logprobs(ref, ro, T)
    assert cast_modules(policy) == []                                                       # forwards given back
    assert plain.abs().sum() > 0 and torch.equal(fast, plain) and torch.equal(fast_ref, plain_ref)
    assert not torch.equal(plain, plain_ref)                                                # LoRA B ≠ 0: two policies
    assert plain_grads.keys() == fast_grads.keys() and len(plain_grads) == 2 * 14
    for name, g in plain_grads.items():
        assert g.abs().sum() > 0 and torch.equal(fast_grads[name], g), name


def test_full_fine_tuning_casts_only_the_frozen_reference_copy():
    """Every weight of the policy trains (autocast casts it per call, its gradient flows through that cast);
    the frozen π_ref copy (its LM head tied to its embeddings) is cast once and gives the same log-probs."""
    model, tok = load_model_and_tokenizer("tiny")
    ref = frozen_copy(model)
    ro = _rollout(len(tok))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        plain = completion_logprobs(ref, ro, T)
        with frozen_casts(model, ref):
            assert cast_modules(model) == []
            assert len(cast_modules(ref)) == 7 * 2 + 1
            assert ref.lm_head.weight is ref.model.embed_tokens.weight
            fast = completion_logprobs(ref, ro, T)
    assert plain.abs().sum() > 0 and torch.equal(fast, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_linear_with_bias_is_autocasts_own_call_bit_for_bit(dtype):
    """Output and input gradient of a frozen Linear with a bias, under bf16 and fp16 autocast."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 16).requires_grad_(False)
    with torch.no_grad():
        lin.bias.normal_(0, 1, generator=g)
    x = torch.randn(5, 24, generator=g, requires_grad=True)
    outputs = []
    for once in (False, True):
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False), \
                frozen_casts(lin) if once else contextlib.nullcontext():
            assert len(cast_modules(lin)) == once
            y = lin(x)
            (gx,) = torch.autograd.grad((y.float() * torch.linspace(-1, 1, 16)).sum(), x)
        outputs.append((y, gx))
    (y0, g0), (y1, g1) = outputs
    assert y0.dtype == dtype and torch.equal(y1, y0) and torch.equal(g1, g0)


def test_a_weight_changed_inside_the_block_is_not_served_stale():
    """Changed in place, or swapped (`.data =`, as the rollout's merge does), or called under autocast of
    another dtype: the layer computes what autocast computes with the weight as it is now."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 16, bias=False).requires_grad_(False)
    x = torch.randn(5, 24, generator=g)

    def plain():
        with own_forwards(lin):
            return lin(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), frozen_casts(lin):
        before = lin(x)
        assert torch.equal(before, plain())
        lin.weight.mul_(2.0)                                                                # in place
        assert not torch.equal(lin(x), before) and torch.equal(lin(x), plain())
        lin.weight.data = torch.randn(16, 24, generator=g)                                  # swapped
        assert torch.equal(lin(x), plain())
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            assert lin(x).dtype == torch.float16 and torch.equal(lin(x), plain())


def test_nothing_changes_without_autocast_and_forwards_come_back_on_error():
    policy, tok = _policy()
    ro = _rollout(len(tok))
    with frozen_casts(policy):
        assert cast_modules(policy) == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="in the middle"):
            with frozen_casts(policy):
                assert cast_modules(policy)
                raise RuntimeError("in the middle")
        assert cast_modules(policy) == []
        with frozen_casts(policy), torch.autocast("cpu", enabled=False), torch.no_grad():  # autocast off inside
            inside = completion_logprobs(policy, ro, T)
    with torch.no_grad():
        assert torch.equal(inside, completion_logprobs(policy, ro, T))                       # the fp32 weights


def test_a_weight_two_layers_share_is_cast_once():
    a, b = nn.Linear(8, 4, bias=False).requires_grad_(False), nn.Linear(8, 4, bias=False)
    b.weight = a.weight
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_casts(nn.Sequential(a, b)):
        assert a.__dict__["forward"].weight is b.__dict__["forward"].weight
