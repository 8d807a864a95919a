"""`models.lora` as pure functions of tensors: two LoRA updates stacked into one, checked against the
sum of the two updates worked out directly; a module only one adapter adapts; bad input."""
import pytest
import torch

from models.lora import LoraDelta, check_lora_config, lora_rank, stack_lora

D_IN, D_OUT = 5, 3


def delta(r: int, scale: float, seed: int) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta(A=torch.randn(r, D_IN, generator=g), B=torch.randn(D_OUT, r, generator=g), scale=scale)


def test_stack_is_the_sum_of_the_updates():
    """s₁·B₁A₁ + s₂·B₂A₂ = [√s₁·B₁ | √s₂·B₂] · [√s₁·A₁ ; √s₂·A₂], rank r₁ + r₂, scale 1."""
    sft = {"q": delta(4, 2.0, 0), "v": delta(4, 2.0, 1)}      # r₁ = 4, α₁ = 8
    grpo = {"q": delta(2, 0.5, 2), "o": delta(2, 0.5, 3)}     # r₂ = 2, α₂ = 1
    stacked = stack_lora(sft, grpo)
    assert list(stacked) == ["q", "v", "o"]                    # the union, first adapter's order first
    for name, d in stacked.items():
        assert d.A.shape == (6, D_IN) and d.B.shape == (D_OUT, 6) and d.scale == 1.0
    torch.testing.assert_close(stacked["q"].delta(), sft["q"].delta() + grpo["q"].delta())
    torch.testing.assert_close(stacked["v"].delta(), sft["v"].delta())  # zeros in the GRPO block
    torch.testing.assert_close(stacked["o"].delta(), grpo["o"].delta())  # zeros in the SFT block
    assert not stacked["v"].A[4:].any() and not stacked["o"].B[:, :4].any()
    # by hand, rank 1 each: s₁·b₁a₁ᵀ + s₂·b₂a₂ᵀ with s₁ = 4, s₂ = 1/4
    one = LoraDelta(A=torch.tensor([[1.0, 0.0]]), B=torch.tensor([[1.0], [2.0]]), scale=4.0)
    two = LoraDelta(A=torch.tensor([[0.0, 2.0]]), B=torch.tensor([[4.0], [0.0]]), scale=0.25)
    torch.testing.assert_close(stack_lora({"m": one}, {"m": two})["m"].delta(), torch.tensor([[4.0, 2.0], [8.0, 0.0]]))


def test_stack_refuses_what_is_not_one_rank_or_shape():
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]"):
        stack_lora({"q": delta(4, 1.0, 0), "v": delta(2, 1.0, 1)}, {"q": delta(2, 1.0, 2)})
    wide = LoraDelta(A=torch.zeros(2, D_IN + 1), B=torch.zeros(D_OUT, 2), scale=1.0)
    with pytest.raises(ValueError, match="q: the adapters disagree on its shape"):
        stack_lora({"q": delta(4, 1.0, 0)}, {"q": wide})
    assert lora_rank({"q": delta(3, 1.0, 0)}, "x") == 3


def test_only_plain_lora_configs():
    check_lora_config({"peft_type": "LORA", "bias": "none", "use_dora": False, "modules_to_save": None}, "ok")
    with pytest.raises(ValueError, match="here: peft_type='PREFIX_TUNING'"):
        check_lora_config({"peft_type": "PREFIX_TUNING"}, "here")
    with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\], bias='all'"):
        check_lora_config({"peft_type": "LORA", "modules_to_save": ["lm_head"], "bias": "all"}, "here")
