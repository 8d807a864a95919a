"""GRPOModule end to end on the tiny model: option checks, a smoke `fit`, and learning."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from data.types import LOOKUP, QAExample
from grpo.module import GRPOModule
from tests.fakes import fake_rollout
from grpo.agent import cosine_with_warmup, schedule_length


def test_cosine_with_warmup_by_hand():
    """10 steps, 20 % warm-up: 1/2, 2/2, then cosine from 1 down to 0 over the last 8 steps."""
    f = [cosine_with_warmup(s, 10, 0.2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)                                     # progress 0/8
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))   # progress 4/8 -> 0.5
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


@pytest.mark.parametrize("option, value, message", [
    ("group_size", 1, "model.group_size=1"),
    ("max_new_tokens", 0, "model.max_new_tokens=0"),
    ("temperature", -1.0, "model.temperature=-1.0"),
    ("top_p", 1.5, "model.top_p=1.5"),
    ("top_p", 0.9, "model.top_p=0.9: GRPO training must sample"),
    ("eval_top_p", 0.0, "model.eval_top_p=0.0"),
    ("beta", -0.1, "model.beta=-0.1"),
    ("reward", "accuracy", "model.reward='accuracy'"),
    ("model_name", "no-such-model", "model_name='no-such-model'"),
    ("dtype", "int8", None),
])
def test_bad_options_fail_before_loading(option, value, message):
    """A bad value raises at construction, naming the option; no model is loaded."""
    if option == "dtype":  # checked when the weights load; only the name is validated up front
        m = GRPOModule(model_name="tiny", dtype=value)
        with pytest.raises(ValueError, match="dtype='int8'"):
            m.configure_model()
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GRPOModule(**{"model_name": "tiny", option: value})


class _EasyReward(GRPOModule):
    """Reward 1 for writing `<answer>` and 1 more for `yes</answer>`: learnable from scratch."""

    def compute_rewards(self, ro, batch):
        r = torch.tensor([float("<answer>" in t) + float("yes</answer>" in t) for t in ro.texts])
        return r, {"tags": r}, r == 2


class _Record(L.Callback):
    def __init__(self):
        self.rewards = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(float(trainer.callback_metrics["reward/mean"]))


def test_grpo_learns_an_easy_reward():
    """The proof that the gradient has the right sign: the mean reward must clearly rise.

    Tiny random model, full fine-tuning, G=8, B=4, 30 steps. Measured: the first five steps
    average 0.044, the last five 0.562; with the advantage sign flipped by hand, 0.031 and
    0.000, so this test fails on a sign error.
    """
    L.seed_everything(0)
    module = _EasyReward(model_name="tiny", lora=False, group_size=8, max_new_tokens=8, lr=3e-3,
                         warmup_ratio=0.0, beta=0.04)
    module.env = lambda query: "nothing found"
    questions = [QAExample(id=str(i), question="Say yes.", answers=("yes",), kind=LOOKUP) for i in range(4)]
    record = _Record()
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, DataLoader(questions * 100, batch_size=4, collate_fn=lambda b: b))
    before, after = sum(record.rewards[:5]) / 5, sum(record.rewards[-5:]) / 5
    print(f"learning test: mean reward, first 5 steps {before:.3f}, last 5 steps {after:.3f}")  # pytest -s
    assert after > before + 0.3, f"mean reward did not rise: first 5 steps {before:.3f}, last 5 {after:.3f}"


# --------------------------------------------------------------------------------------- the step's plumbing


class _RandomReward(GRPOModule):
    """Seeded random rewards: every group has spread, so every update moves the policy."""

    def compute_rewards(self, ro, batch):
        r = torch.rand(len(ro.texts), generator=torch.Generator().manual_seed(self.global_step))
        return r, {"random": r}, r > 0.5


class _LRs(_RandomReward):
    """Records the LR each optimizer step uses, and how many rollouts were made."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.lrs, self.rollouts = [], 0

    def optimize(self, loss):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        super().optimize(loss)

    def rollout(self, *a, **kw):
        self.rollouts += 1
        return super().rollout(*a, **kw)


def _fit(module, max_steps, batch_size=2, questions=None):
    module.env = lambda query: "nothing found"
    questions = questions or [QAExample(id=str(i), question=f"Question {i}?", answers=("yes",), kind=LOOKUP)
                              for i in range(8)]
    record = _Record()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, DataLoader(questions * 10, batch_size=batch_size, collate_fn=lambda b: b))
    return trainer


@pytest.mark.parametrize("num_updates", [1, 2])
def test_lr_of_every_update_follows_the_schedule(num_updates):
    """max_steps counts optimizer updates (μ per rollout): max_steps 4 with μ = 2 is 2 rollouts, and the
    LR used by update k is lr·cosine_with_warmup(k, 4, 0.25) = lr·(1, 1, 0.75, 0.25), ending at 0."""
    L.seed_everything(0)
    m = _LRs(model_name="tiny", group_size=2, max_new_tokens=4, lr=1e-3, warmup_ratio=0.25, num_updates=num_updates)
    trainer = _fit(m, max_steps=4)
    assert m.rollouts == 4 // num_updates and trainer.global_step == 4
    assert m.lrs == pytest.approx([1e-3 * f for f in (1.0, 1.0, 0.75, 0.25)])
    assert m.lrs == pytest.approx([1e-3 * cosine_with_warmup(k, 4, 0.25) for k in range(4)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule's end


def test_schedule_length():
    """Optimizer steps of a run: μ·batches·epochs, capped by max_steps; a max_steps μ does not divide is refused."""
    assert schedule_length(1, 7, 7, None, 10) == 7                     # μ = 1: Lightning's own estimate
    assert schedule_length(2, 10, -1, 3, 10) == 60                     # 3 epochs of 10 batches, 2 updates each
    assert schedule_length(2, 10, 8, 3, 10) == 8                       # max_steps first
    with pytest.raises(ValueError, match="trainer.max_steps=5 is not a multiple of model.num_updates=2"):
        schedule_length(2, 5, 5, None, 10)


class _LastUpdate(_RandomReward):
    """Keeps the loss diagnostics of every update."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ratios, self.clip_fracs, self.kls = [], [], []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        metrics = self.trainer.callback_metrics
        self.ratios.append(float(metrics["loss/ratio_mean"]))
        self.clip_fracs.append(float(metrics["loss/clip_frac"]))
        self.kls.append(float(metrics["loss/kl"]))
        return out


def test_second_update_sees_the_old_policy():
    """μ = 2 with a large lr: the second update's ratio π_θ/π_old is not 1 and the clip acts. (If π_old
    were taken from the current policy, the ratio would be exactly 1 and clip_frac 0.)"""
    L.seed_everything(0)
    m = _LastUpdate(model_name="tiny", lora=False, group_size=4, max_new_tokens=8, lr=5e-2, warmup_ratio=0.0,
                    num_updates=2, beta=0.0, clip_eps=0.05)
    _fit(m, max_steps=4)
    assert max(abs(r - 1) for r in m.ratios) > 1e-2 and max(m.clip_fracs) > 0, (m.ratios, m.clip_fracs)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_is_the_starting_policy(lora):
    """After updates with β > 0, π_ref still gives the log-probs of the policy as it was before training
    (fresh LoRA adapters are 0, so that is the base; full fine-tuning: the frozen copy), while the
    policy has moved, and the logged KL is > 0. A π_ref that is the trained policy itself fails both."""
    from copy import deepcopy
    from grpo.logprobs import completion_logprobs

    L.seed_everything(0)
    m = _LastUpdate(model_name="tiny", lora=lora, group_size=4, max_new_tokens=8, lr=2e-2, warmup_ratio=0.0,
                    beta=0.1, lora_r=4, temperature=0.7)
    m.configure_model()
    start = deepcopy(m.policy).eval()
    _fit(m, max_steps=3)
    assert m.kls[-1] > 1e-4, m.kls
    ro = m.rollout([QAExample(id="a", question="Hi?", answers=("x",), kind=LOOKUP)], 0.7, 4)
    mask = ro.completion_mask.bool()
    with torch.no_grad():  # π_ref at the sampling temperature, like everything the loss scores
        ref, want, now = (m.reference_logprobs(ro), completion_logprobs(start, ro, 0.7),
                          completion_logprobs(m.policy, ro, 0.7))
    assert (now - want)[mask].abs().max() > 1e-3, "the policy did not move"
    torch.testing.assert_close(ref[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_rollout_sampler_follows_the_module_device(monkeypatch):
    """torch.multinomial needs its generator on the logits' device: the sampler is made on the module's
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


def test_rewards_go_to_their_own_question():
    """Sample n answers question n // G: B = 2, G = 2, golds Paris then Rome. VOI totals by hand:
    correct direct 1.0 + 0.1 + 0.1 = 1.2; wrong direct -0.5 + 0.1 = -0.4."""
    m = GRPOModule(model_name="tiny", group_size=2)
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind=LOOKUP),
             QAExample(id="it", question="Capital of Italy?", answers=("Rome",), kind=LOOKUP)]
    texts = ["<answer>Paris</answer>", "<answer>Rome</answer>", "<answer>Rome</answer>", "<answer>Paris</answer>"]
    rewards, parts, correct = m.compute_rewards(fake_rollout(texts, G=2), batch)
    assert rewards.tolist() == pytest.approx([1.2, -0.4, 1.2, -0.4])
    assert parts["correct"].tolist() == pytest.approx([1.0, -0.5, 1.0, -0.5])
    assert correct.tolist() == [True, False, True, False]


def test_otc_charges_refused_calls():
    """OTC counts every attempted call: a correct sample with 1 executed + 2 refused calls has m = 3
    against n = 1, so r_tool = sin(f·π/2) with f = 2·1·3/(1+3) = 1.5: sin(0.75π) = 0.707 (not 1)."""
    m = GRPOModule(model_name="tiny", group_size=2, reward="otc")
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind=LOOKUP)]
    done = "<call>x</call><obs>o</obs><answer>Paris</answer>"
    refused = "<call>x</call><obs>o</obs><call>y</call><obs>o</obs><call>z</call><obs>o</obs><answer>Paris</answer>"
    rewards, parts, correct = m.compute_rewards(fake_rollout([done, refused], [1, 1], [0, 2], G=2), batch)
    assert parts["tool_factor"].tolist() == pytest.approx([1.0, math.sin(0.75 * math.pi)])
    assert rewards.tolist() == pytest.approx([1.1, math.sin(0.75 * math.pi) + 0.1]) and correct.all()


def test_grpo_on_the_raw_smollm2_is_refused_before_loading():
    """SmolLM2 writes no tags without a cold start: fit without init_adapter fails at setup, naming both."""
    m = GRPOModule(model_name="smollm2-135m-instruct")
    with pytest.raises(ValueError, match="model.init_adapter=None"):
        m.setup("fit")
    assert m.policy is None


def test_first_update_ratio_is_one_at_the_sampling_temperature():
    """μ = 1, fp32, T = 0.7: at the first update π_θ is the policy that sampled, so ρ = π_θ/π_old is 1
    up to rounding on every token and nothing is clipped. Fails if the loss scores another temperature
    or other positions than the sampler did, or takes π_old from anything but the sampler."""
    L.seed_everything(0)
    m = _LastUpdate(model_name="tiny", group_size=4, max_new_tokens=12, temperature=0.7, lr=1e-3, clip_eps=1e-3)
    _fit(m, max_steps=1)
    assert abs(m.ratios[0] - 1) < 1e-4 and m.clip_fracs[0] == 0.0, (m.ratios, m.clip_fracs)


class _GradNorms(_RandomReward):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.norms = []

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad.norm() for p in self.policy.parameters() if p.grad is not None]
        self.norms.append(float(torch.stack(grads).norm()))


def test_gradients_are_clipped_to_max_grad_norm():
    """The global gradient norm that reaches the optimizer is at most max_grad_norm (a large lr makes
    the raw norms larger: the first, unclipped run shows it)."""
    raw = _GradNorms(model_name="tiny", lora=False, group_size=4, max_new_tokens=8, max_grad_norm=0.0, lr=1e-3)
    L.seed_everything(0)
    _fit(raw, max_steps=2)
    clipped = _GradNorms(model_name="tiny", lora=False, group_size=4, max_new_tokens=8, max_grad_norm=1e-3, lr=1e-3)
    L.seed_everything(0)
    _fit(clipped, max_steps=2)
    assert min(raw.norms) > 1e-3 and max(clipped.norms) <= 1e-3 * (1 + 1e-4), (raw.norms, clipped.norms)


class _OwnGradients(_RandomReward):
    """Checks that every optimizer step sees exactly the gradient of its own loss (nothing left over
    from the previous update: μ = 2 makes two updates per batch)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.errors = []

    def optimize(self, loss):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self._expected = torch.autograd.grad(loss, params, retain_graph=True)
        super().optimize(loss)

    def on_before_optimizer_step(self, optimizer):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.errors.append(max(float((p.grad - g).abs().max()) for p, g in zip(params, self._expected)))


def test_each_update_uses_only_its_own_gradient():
    L.seed_everything(0)
    m = _OwnGradients(model_name="tiny", group_size=4, max_new_tokens=8, num_updates=2, max_grad_norm=0.0, lr=1e-2)
    _fit(m, max_steps=4)
    assert len(m.errors) == 4 and max(m.errors) < 1e-6, m.errors


def test_evaluation_rollouts_use_the_eval_settings(monkeypatch):
    """validation_step samples with eval_temperature, eval_top_p and eval_max_new_tokens, one completion
    per question, not with the training temperature; its rows score each question against its own gold."""
    m = GRPOModule(model_name="tiny", temperature=0.9, eval_temperature=0.0, eval_top_p=0.5, max_new_tokens=10,
                   eval_max_new_tokens=7)
    seen = []

    def recorded_rollout(batch, temperature, group_size, max_new_tokens=None, top_p=1.0):
        seen.append((temperature, group_size, max_new_tokens, top_p))
        return fake_rollout(["<answer>Paris</answer>", "<call>x</call><obs>o</obs><answer>Rome</answer>"], [0, 1])

    monkeypatch.setattr(m, "rollout", recorded_rollout)
    batch = [QAExample(id="fr", question="Capital of France?", answers=("Paris",), kind="memory"),
             QAExample(id="es", question="Capital of Spain?", answers=("Madrid",), kind=LOOKUP)]
    rows = m.validation_step(batch, 0)
    assert seen == [(0.0, 1, 7, 0.5)]
    assert [(r["em"], r["calls"], r["kind"]) for r in rows] == [(1.0, 0.0, "memory"), (0.0, 1.0, "lookup")]
