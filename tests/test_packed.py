"""models.packed.packed_linears: inside it every bf16 or fp32 nn.Linear of a CPU model calls oneDNN with a
weight packed once; in bf16 the model computes the very same logits (bit for bit) as with plain
`F.linear` and a rollout samples the same tokens with the same log-probs; in fp32 the same up to
rounding; every module gets its own forward back on exit, also on error; a dtype the CPU cannot pack is
left to the plain call instead of raising. Tiny random Llama (tests only)."""
import contextlib

import pytest
import torch
from torch import nn

import grpo.rollout
import models.packed as packed
from grpo.rollout import rollout
from models.loading import tiny_model
from models.tokenizer import ByteTokenizer
from tests.test_attention import decode_steps

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not packed.available(), reason="this PyTorch build has no oneDNN packed-linear ops")]


needs_bf16_packing = pytest.mark.skipif(not packed.packs(torch.bfloat16),
                                        reason="this CPU's oneDNN cannot pack bf16 weights (needs AVX512-BW/VL/DQ or "
                                               "AVX-NE-CONVERT); test_a_dtype_the_cpu_cannot_pack_is_left_alone covers it")


def bf16_model():
    return tiny_model(300).to(torch.bfloat16).eval()


def patched(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), packed._PackedForward)]


@needs_bf16_packing
def test_packed_model_gives_the_same_logits_bit_for_bit():
    model = bf16_model()
    ids, mask = torch.tensor([[0, 5, 6, 7], [9, 10, 11, 12]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        plain = decode_steps(model, ids, mask)                                          # (4, 2, V)
        with packed.packed_linears(model):
            linears = [m for m in model.modules() if type(m) is nn.Linear]
            assert patched(model) == linears and len(linears) == 7 * model.config.num_hidden_layers + 1
            fast = decode_steps(model, ids, mask)
    assert torch.equal(fast, plain)
    assert patched(model) == []                                                         # forwards given back


@pytest.mark.parametrize("dtype, other", [
    pytest.param(torch.bfloat16, torch.float32, marks=needs_bf16_packing),
    (torch.float32, torch.bfloat16)])                                                   # fp32: every oneDNN CPU
def test_linear_with_bias_other_dtypes_and_gradients(dtype, other):
    """A bias is added as F.linear adds it (bf16: bit for bit; fp32: up to rounding, another GEMM); an input of
    another dtype, or one that needs a gradient, takes the plain path."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    want = layer(x)
    with packed.packed_linears(layer):
        assert patched(layer) == [layer]
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-5)
        xg = x.clone().requires_grad_()
        layer(xg).sum().backward()
        assert xg.grad is not None                                                      # plain path: differentiable
        with pytest.raises(RuntimeError):
            layer(x.to(other))                                                          # as F.linear: dtypes must match


def test_fp32_packed_equals_plain_up_to_rounding_and_fp16_is_left_alone():
    """fp32: ATen's plain call is MKL's GEMM, the packed one oneDNN's: equal up to fp32 rounding (the
    logits of this model are O(1)). fp16 weights are not packed."""
    model = tiny_model(300).eval()
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        plain = decode_steps(model, ids, mask)
        with packed.packed_linears(model):
            assert len(patched(model)) == 7 * model.config.num_hidden_layers + 1
            fast = decode_steps(model, ids, mask)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
    with packed.packed_linears(model, rows=packed.FP32_MIN_ROWS - 1):
        assert patched(model) == []                                                     # one row: MKL is as fast
    model = tiny_model(300).half()
    with packed.packed_linears(model):
        assert patched(model) == []


@needs_bf16_packing
def test_errors_restore_every_forward():
    model = bf16_model()
    with pytest.raises(KeyError), packed.packed_linears(model):
        assert patched(model)
        raise KeyError("boom")
    assert patched(model) == []


@needs_bf16_packing
def test_rollout_with_packed_weights_samples_the_same(monkeypatch):
    """A bf16 rollout (tool turns included) gives the same tokens, texts and π_old log-probs with the weights
    packed as without."""
    model, tok = bf16_model(), ByteTokenizer()

    def run():
        return rollout(model, tok, ["Capital of France?", "Population of Peru, please?"], lambda q: "found: Lima",
                       group_size=3, max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(4))

    fast = run()
    monkeypatch.setattr(grpo.rollout, "packed_linears", lambda m, rows: contextlib.nullcontext(m))
    plain = run()
    assert fast.texts == plain.texts
    assert torch.equal(fast.input_ids, plain.input_ids) and torch.equal(fast.sample_logp, plain.sample_logp)


def test_a_dtype_the_cpu_cannot_pack_is_left_alone(monkeypatch):
    """Where oneDNN refuses to pack a dtype (bf16 on an AVX2-only CPU raises in `_reorder_linear_weight`),
    `packs` says so and `packed_linears` leaves those layers to the plain call: the model decodes, it does not
    crash inside the library. The probe's answer is cached per dtype."""
    def refuse(weight, rows_hint):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")
        return real(weight, rows_hint)

    real = packed._reorder
    monkeypatch.setattr(packed, "_reorder", refuse)
    packed.packs.cache_clear()
    try:
        assert not packed.packs(torch.bfloat16) and packed.packs(torch.float32)
        model = bf16_model()
        ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
        with torch.no_grad():
            plain = decode_steps(model, ids, mask)
            with packed.packed_linears(model):
                assert patched(model) == []
                assert torch.equal(decode_steps(model, ids, mask), plain)
        fp32 = tiny_model(300).eval()
        with packed.packed_linears(fp32):
            assert len(patched(fp32)) == 7 * fp32.config.num_hidden_layers + 1           # fp32 still packed
    finally:
        packed.packs.cache_clear()                                                      # no refusal leaks out
