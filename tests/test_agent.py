"""AgentModule (grpo/agent.py), what GRPO and SFT share: the LR schedule, the checks of the shared
options, the rollout sampler's device and saved state, decoding with LoRA merged, evaluation
rollouts, and evaluation rows gathered over DDP ranks. GRPO's own: tests/test_module.py."""
from __future__ import annotations

import math
import re

import pytest
import torch

from data.types import LOOKUP, QAExample
from grpo.agent import cosine_with_warmup, schedule_length
from grpo.evaluation import gather_eval_rows
from grpo.module import GRPOModule
from grpo.sft import SFTModule
from tests.fakes import fake_rollout

# --------------------------------------------------------------------------------------- the LR schedule


def test_cosine_with_warmup_by_hand():
    """10 steps, 20 % warm-up: 1/2, 2/2, then cosine from 1 down to 0 over the last 8 steps."""
    f = [cosine_with_warmup(s, 10, 0.2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)                                     # progress 0/8
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))   # progress 4/8 -> 0.5
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_schedule_length():
    """Optimizer steps of a run: μ·batches·epochs, capped by max_steps; a max_steps μ does not divide is refused."""
    assert schedule_length(1, 7, 7, None, 10) == 7                     # μ = 1: Lightning's own estimate
    assert schedule_length(2, 10, -1, 3, 10) == 60                     # 3 epochs of 10 batches, 2 updates each
    assert schedule_length(2, 10, 8, 3, 10) == 8                       # max_steps first
    with pytest.raises(ValueError, match="trainer.max_steps=5 is not a multiple of model.num_updates=2"):
        schedule_length(2, 5, 5, None, 10)

# --------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value", [
    ("max_new_tokens", 0), ("max_obs_tokens", 0), ("max_tool_calls", -1), ("eval_temperature", -0.5),
    ("eval_top_p", 0.0), ("eval_max_new_tokens", 0), ("lr", 0.0), ("warmup_ratio", 1.0), ("weight_decay", -0.1),
    ("max_grad_norm", -1.0), ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.5),
])
def test_bad_options_fail_before_loading(option, value):
    """A bad value of a shared option raises at construction (SFT's as GRPO's), naming `model.<option>=<value>`;
    no model is loaded. (Unchecked, eval_max_new_tokens=0 would silently be the training budget, and
    lora_dropout, weight_decay and max_grad_norm would fail only after the model loaded.)"""
    for module in (SFTModule, GRPOModule):
        with pytest.raises(ValueError, match=rf"model\.{option}={re.escape(repr(value))}"):
            module(model_name="tiny", **{option: value})


def test_grpo_with_lora_dropout_warns(recwarn):
    """The rollout samples without dropout, the loss pass with it: GRPO warns (SFT does not)."""
    with pytest.warns(UserWarning, match=r"lora_dropout=0\.1"):
        GRPOModule(model_name="tiny", lora_dropout=0.1)
    SFTModule(model_name="tiny", lora_dropout=0.1)
    GRPOModule(model_name="tiny")
    assert not [w for w in recwarn if "lora_dropout" in str(w.message)]


def test_model_name_and_dtype_are_checked():
    with pytest.raises(ValueError, match="model_name='no-such-model'"):
        SFTModule(model_name="no-such-model")
    with pytest.raises(ValueError, match="model.rollout_dtype='fp8'"):
        GRPOModule(model_name="tiny", rollout_dtype="fp8")
    m = SFTModule(model_name="tiny", dtype="int8")  # checked when the weights load; only the name up front
    with pytest.raises(ValueError, match="dtype='int8'"):
        m.configure_model()

# --------------------------------------------------------------------------------------- the rollout sampler


def test_rollout_sampler_follows_the_module_device(monkeypatch):
    """The sampler's torch.rand needs its generator on the logits' device: the sampler is made on the module's
    device (a CUDA device is faked here: no GPU), seeded per rank, and rebuilt when the module moves."""
    made = []

    class RecordingGenerator:
        def __init__(self, device="cpu"):
            self.device, self.seed = torch.device(device), None
            made.append(self)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    m = GRPOModule(model_name="tiny", seed=7)
    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    assert m.sampler.device == torch.device("cpu") and m.sampler.seed == 7
    monkeypatch.setattr(m, "_device", torch.device("cuda", 0))
    g = m.sampler
    assert g.device == torch.device("cuda", 0) and g.seed == 7 and len(made) == 2
    assert m.sampler is g  # kept while the device stays


def test_sampler_state_from_another_device_type_restarts_with_a_warning():
    m = GRPOModule(model_name="tiny", seed=3)
    state = torch.Generator().manual_seed(123).get_state()
    m.on_load_checkpoint({"sampler_rng": [state], "sampler_device": "cpu"})
    assert torch.equal(m.sampler.get_state(), state)  # same device type: resumed exactly
    m.on_load_checkpoint({"sampler_rng": [torch.zeros(16, dtype=torch.uint8)], "sampler_device": "cuda"})
    with pytest.warns(UserWarning, match="saved on 'cuda'"):
        g = m.sampler
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())

# --------------------------------------------------------------------------------------- decoding with LoRA merged


def tiny_module_with_lora_update(**options) -> GRPOModule:
    """A tiny GRPO module (G = 4, 24 tokens, T = 0.7, a tool that finds nothing) whose LoRA update is not
    zero: a fresh LoRA has B = 0, so its B is drawn from N(0, 0.2²) (seeded)."""
    m = GRPOModule(model_name="tiny", **{"lora_r": 4, "group_size": 4, "max_new_tokens": 24, "temperature": 0.7}
                   | options)
    m.env = lambda query: "nothing found"
    m.configure_model()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return m


def test_rollout_decodes_with_lora_merged_and_samples_from_the_adapter_policy():
    """The rollout decodes with the LoRA update merged into the weights (no LoRA matmul runs), yet what it
    records as π_old is the adapter policy's: its sample_logp equals `completion_logprobs` of the same
    ids on the unmerged policy (fp32 rounding); afterwards every parameter is bit-identical and the
    adapters run again. Full fine-tuning (nothing to merge) gives the same agreement."""
    from grpo.logprobs import completion_logprobs

    batch = [QAExample(id="a", question="Hi?", answers=("x",), kind=LOOKUP),
             QAExample(id="b", question="What is the capital of France?", answers=("Paris",), kind=LOOKUP)]
    for lora in (True, False):
        m = tiny_module_with_lora_update(lora=lora)
        before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
        calls = []
        for name, module in m.policy.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_hook(lambda *_: calls.append(1))
        ro = m.rollout(batch, temperature=0.7, group_size=4)
        assert not calls, "a LoRA matmul ran during the rollout"
        assert m.policy.training  # the rollout gives the policy back in training mode
        assert all(torch.equal(p, before[n]) for n, p in m.policy.named_parameters())
        mask = ro.completion_mask.bool()
        assert mask.sum() > 30
        with torch.no_grad():
            logp = completion_logprobs(m.policy, ro, 0.7)                            # (N, C) adapters unmerged
        assert calls or not lora
        torch.testing.assert_close(ro.sample_logp[mask], logp[mask], atol=1e-5, rtol=1e-5)


def test_rollout_dtype_decodes_a_bf16_copy_and_records_what_it_sampled():
    """`rollout_dtype="bfloat16"`: every decode matmul runs on bf16 weights (LoRA merged, then cast), the fp32
    policy comes back bit-identical, and π_old (sample_logp) is the bf16 sampler's: close to the fp32 loss
    pass's log-probs of the adapter policy, not equal to them, and far from the policy without its
    adapters (the update is decoded too). The policy's own dtype, or None, casts nothing."""
    from grpo.logprobs import completion_logprobs
    from models.loading import reference_policy

    batch = [QAExample(id="a", question="What is the capital of France?", answers=("Paris",), kind=LOOKUP)]
    m = tiny_module_with_lora_update(rollout_dtype="bfloat16")
    before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
    seen = set()
    for module in m.policy.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda mod, args, out: seen.add((mod.weight.dtype, args[0].dtype)))
    ro = m.rollout(batch, temperature=0.7, group_size=4)
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in m.policy.named_parameters())
    mask = ro.completion_mask.bool()
    assert mask.sum() > 30
    with torch.no_grad():
        logp = completion_logprobs(m.policy, ro, 0.7)                                   # (N, C) fp32
        with reference_policy(m.policy) as base:
            base_logp = completion_logprobs(base, ro, 0.7)                              # (N, C) no LoRA
    gap = (ro.sample_logp - logp)[mask].abs()
    assert 0 < gap.max() < 0.5 and gap.mean() < 0.05
    assert (ro.sample_logp - base_logp)[mask].abs().mean() > 5 * gap.mean()
    assert m.rollout_torch_dtype == torch.bfloat16
    assert GRPOModule(model_name="tiny", rollout_dtype="float32").rollout_torch_dtype is None  # = the weights'
    assert GRPOModule(model_name="tiny").rollout_torch_dtype is None


# --------------------------------------------------------------------------------------- evaluation


def test_evaluation_rollouts_use_the_eval_settings(monkeypatch):
    """validation_step samples with eval_temperature, eval_top_p and eval_max_new_tokens, one completion
    per question, not with the training temperature; its rows score each question against its own gold."""
    m = GRPOModule(model_name="tiny", temperature=0.9, eval_temperature=0.0, eval_top_p=0.5, max_new_tokens=10,
                   eval_max_new_tokens=7)
    seen = []

    def recorded_rollout(batch, temperature, group_size, max_new_tokens=None, top_p=1.0, generator=None):
        seen.append((temperature, group_size, max_new_tokens, top_p))
        assert generator is not None and generator is not m.sampler  # its own RNG, not the training stream
        return fake_rollout(["<answer>Paris</answer>", "<call>x</call><obs>o</obs><answer>Rome</answer>"], [0, 1])

    monkeypatch.setattr(m, "rollout", recorded_rollout)
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind="memory"),
             QAExample(id="es", question="Capital of Spain?", answers=("Madrid",), kind=LOOKUP)]
    rows = m.validation_step(batch, 0)
    assert seen == [(0.0, 1, 7, 0.5)]
    assert [(r["em"], r["calls"], r["kind"]) for r in rows] == [(1.0, 0.0, "memory"), (0.0, 1.0, "lookup")]


def test_sampled_evaluation_leaves_the_training_stream_alone():
    """An evaluation at eval_temperature > 0 samples from its own RNG, keyed by (seed, step, rank, batch):
    the training sampler's state is the same after it (so how often a run evaluates cannot change what it
    trains on, nor a resume what it evaluates), and the same batch at the same step gives the same rows."""
    m = tiny_module_with_lora_update(eval_temperature=1.0, eval_max_new_tokens=12)
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind="memory")]
    before = m.sampler.get_state().clone()
    first, again = m.validation_step(batch, 0), m.validation_step(batch, 0)
    assert torch.equal(m.sampler.get_state(), before)
    assert first[0]["text"] == again[0]["text"]
    texts = {m.validation_step(batch, b)[0]["text"] for b in range(1, 5)}   # other batches: other draws
    assert len(texts | {first[0]["text"]}) > 1


def test_an_interrupted_evaluation_does_not_count_in_the_next(monkeypatch):
    """Rows kept by an evaluation that never reached its epoch end (a crash, a kill, Ctrl-C) are dropped
    when the next one starts, and two modules never share their rows."""
    m, other = GRPOModule(model_name="tiny"), GRPOModule(model_name="tiny")
    texts = iter([["<answer>Rome</answer>"], ["<answer>Paris</answer>"]])
    monkeypatch.setattr(m, "rollout", lambda batch, **kw: fake_rollout(next(texts), [0]))
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind="memory")]
    m.on_validation_epoch_start()
    m.validation_step(batch, 0)                                     # interrupted here: no epoch end
    m.on_validation_epoch_start()
    m.validation_step(batch, 0)
    assert [r["em"] for r in m._eval_rows] == [1.0]
    assert other._eval_rows == ()


def test_gather_eval_rows_counts_each_question_once(tmp_path):
    """One-process gloo group: the rows come back once each, the padded repeat dropped, order kept."""
    rows = [{"id": "a", "question": "A?", "em": 1.0}, {"id": "b", "question": "B?", "em": 0.0},
            {"id": "a", "question": "A?", "em": 1.0}]          # DistributedSampler's padding repeats "a"
    assert gather_eval_rows(rows) is rows                          # not distributed: unchanged
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert gather_eval_rows(rows) == rows[:2]
    finally:
        torch.distributed.destroy_process_group()


def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about():
    """bf16 (precision, weights or rollout copy) on a CPU whose oneDNN lacks bf16 kernels: a warning that names
    the fix; native bf16, fp32, or another device: silence."""
    from grpo.agent import warn_if_bf16_is_slow

    with pytest.warns(UserWarning, match="32-true"):
        warn_if_bf16_is_slow("cpu", uses_bf16=True, native_bf16=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_bf16_is_slow("cpu", uses_bf16=True, native_bf16=True)
        warn_if_bf16_is_slow("cpu", uses_bf16=False, native_bf16=False)
        warn_if_bf16_is_slow("cuda", uses_bf16=True, native_bf16=False)


@pytest.mark.parametrize("avx512_bf16, amx, fast", [(False, False, False), (True, False, True), (False, True, True)])
def test_fast_bf16_needs_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, fast):
    """AVX-512 alone (oneDNN's bf16 kernels exist there, but emulated: 3-4x slower than fp32) is not enough."""
    from grpo.agent import cpu_has_fast_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True, raising=False)
    assert cpu_has_fast_bf16() is fast
