"""models.attention.masked_sdpa: inside it every attention call gets an explicit mask (also where
transformers would drop it), the model computes the same logits as plain SDPA, and the model's
attention implementation is restored on exit, also on error. Tiny random Llama (tests only)."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import models.attention as attention
from grpo.kvcache import left_pad, position_ids_from_mask
from models.loading import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    return tiny_model(300).eval()


def spy_on(monkeypatch, name: str) -> list:
    """The attention_mask argument (None or a tensor) of every call of attention implementation `name`,
    which still computes transformers' SDPA attention."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, name, spy)
    return seen


@pytest.fixture
def masks_seen(monkeypatch):
    """The masks the switched attention gets."""
    return spy_on(monkeypatch, attention.NAME)


def decode_steps(model, ids, mask, steps=3):
    """Prefill `ids` (R, W) under `mask`, then `steps` one-token steps: the logits of each forward's
    last position, stacked (steps + 1, R, V)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    logits, cache = [out.logits[:, -1]], out.cache
    for t in range(steps):
        mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], 1)
        new = torch.full((len(ids), 1), 40 + t)
        out = model(input_ids=new, attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, -1:],
                    cache=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        cache = out.cache
    return torch.stack(logits)


def test_a_mask_reaches_attention_even_without_holes(model, masks_seen):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # equal lengths: the 2-D mask is all ones
    with torch.no_grad(), attention.masked_sdpa(model):
        decode_steps(model, ids, torch.ones_like(ids))
    assert len(masks_seen) == 4 * model.config.num_hidden_layers  # prefill + 3 steps, every layer
    assert all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks_seen)
    prefill, step = masks_seen[0], masks_seen[-1]
    assert prefill.shape == (2, 1, 4, 4) and torch.equal(prefill[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert step.shape == (2, 1, 1, 7) and bool(step.all())  # one query over 7 positions, none masked


def test_plain_sdpa_drops_that_mask(model, monkeypatch):
    """What the switch is for: outside it, transformers gives SDPA no mask for the same forwards."""
    seen = spy_on(monkeypatch, "sdpa")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        decode_steps(model, ids, torch.ones_like(ids))
    assert seen and all(m is None for m in seen)


@pytest.mark.parametrize("rows", [[[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]])
def test_same_logits_as_plain_sdpa(model, rows):
    ids, mask = left_pad(rows, 0)  # equal lengths (no hole), then left padding (holes)
    with torch.no_grad():
        plain = decode_steps(model, ids, mask)
        with attention.masked_sdpa(model):
            switched = decode_steps(model, ids, mask)
    torch.testing.assert_close(switched, plain, rtol=0, atol=1e-5)


def test_restored_on_exit_and_on_error(model):
    assert model.config._attn_implementation == "sdpa"
    with attention.masked_sdpa(model):
        assert model.config._attn_implementation == attention.NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), attention.masked_sdpa(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone(model):
    model.config._attn_implementation = "eager"
    with attention.masked_sdpa(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
    no_config = torch.nn.Linear(2, 2)
    with attention.masked_sdpa(no_config) as m:
        assert m is no_config


def test_models_off_the_cpu_are_left_alone(model):
    model.to("meta")  # any device but the CPU
    with attention.masked_sdpa(model):
        assert model.config._attn_implementation == "sdpa"


def test_the_rollout_gives_every_forward_a_mask(masks_seen):
    """One prompt, G = 2: nothing is padded, so plain SDPA would run every forward without a mask."""
    from grpo.rollout import rollout
    from models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    ro = rollout(model.eval(), tokenizer, ["Hi"], lambda q: "result", group_size=2, max_new_tokens=6,
                 generator=torch.Generator().manual_seed(0))
    assert int(ro.num_generated.sum()) > 2  # several decode steps ran
    assert masks_seen and all(isinstance(m, torch.Tensor) for m in masks_seen)
    assert model.config._attn_implementation == "sdpa"  # given back after the rollout
