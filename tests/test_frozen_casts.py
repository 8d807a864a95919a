"""models.frozen_casts: under bf16 autocast the loss passes compute the same log-probs and LoRA gradients,
bit for bit, with the frozen weights cast once as with autocast casting them at every call; only frozen
fp32 `nn.Linear`s are given a cast copy; nothing changes without autocast; forwards given back on exit."""
import pytest
import torch
from torch import nn

from grpo.logprobs import completion_logprobs
from models.frozen_casts import _CastForward, frozen_casts
from models.loading import frozen_copy, load_model_and_tokenizer, reference_policy
from tests.test_logprobs import T, _grads, _policy, _rollout


def cast_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CastForward)]


def test_lora_logprobs_and_gradients_are_bit_identical_under_bf16_autocast():
    policy, tok = _policy()
    ro = _rollout(len(tok))
    mask = ro.completion_mask.float()
    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
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
    the frozen π_ref copy is cast once."""
    model, _ = load_model_and_tokenizer("tiny")
    ref = frozen_copy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_casts(model, ref):
        assert cast_modules(model) == []
        assert len(cast_modules(ref)) == 7 * 2 + 1


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
