"""GRPOModule on the tiny model: option checks, learning, the step's plumbing (π_old, π_ref, the LR
over μ updates, gradients), the reward of each sample, the token-level loss under DDP, and training
through faults (failing tools, equal rewards, empty and truncated completions). What GRPO shares
with SFT (schedule, sampler, evaluation) is tests/test_agent.py's; the real-process faults (SIGKILL,
two ranks) are tests/test_kill_resume.py's and tests/test_ddp.py's."""
from __future__ import annotations

import functools
import math
import threading

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import grpo.agent
import grpo.logprobs
import grpo.module
from data.types import LOOKUP, QAExample
from grpo.agent import cosine_with_warmup
from envs.protocol import parse_completion
from grpo.losses import masked_mean_tokens
from grpo.module import GRPOModule, ddp_token_scale
from grpo.rewards import OTCWeights, VOIWeights
from grpo.rollout import rollout
from models.tokenizer import ByteTokenizer
from tests.fakes import Biased, fake_rollout
from tests.test_frozen_casts import cast_modules, own_forwards

TOK = ByteTokenizer()
EOS = TOK.eos_token
QUESTIONS = [QAExample(id=str(i), question=f"Question {i}?", answers=("yes",), kind=LOOKUP) for i in range(8)]
FRANCE = [QAExample(id=f"q{i}", question="What is the capital of France?", answers=("Paris",), kind=LOOKUP)
          for i in range(8)]
BATCH = FRANCE[:2]  # B = 2 questions, both answered by "Paris"

# --------------------------------------------------------------------------------------- a tiny fit


class Record(L.Callback):
    """What every training step returned, and the metrics logged by then (floats)."""

    def __init__(self):
        self.outputs, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    @property
    def rewards(self) -> list[float]:
        return [m["reward/mean"] for m in self.metrics]


def fit(module: GRPOModule, steps: int, env=lambda query: "nothing found", questions=QUESTIONS, batch_size: int = 2,
        bias: dict[str, float] | None = None, precision: str = "32-true") -> Record:
    """`steps` optimizer steps of `module` on `questions` (in order, repeated), its tool `env`, the
    tiny model's logits shifted by `bias` if given: what each step returned and logged."""
    if bias:
        module.configure_model()
        module.policy = Biased(module.policy, bias)
    module.env = env
    record = Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record], precision=precision)
    trainer.fit(module, DataLoader(questions * 100, batch_size=batch_size, collate_fn=lambda b: b))
    assert trainer.global_step == steps
    record.trainer = trainer
    return record


def _module(**kwargs) -> GRPOModule:
    L.seed_everything(0)
    options = dict(model_name="tiny", group_size=4, max_new_tokens=16, max_obs_tokens=32, beta=0.0, lr=1e-2,
                   warmup_ratio=0.0)
    return GRPOModule(**(options | kwargs))


def _trainable(module) -> list[torch.Tensor]:
    """Copies of the policy's trainable weights (the policy is built first if needed)."""
    module.configure_model()
    return [p.detach().clone() for p in module.policy.parameters() if p.requires_grad]

# --------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value, message", [
    ("group_size", 1, "model.group_size=1"),
    ("temperature", -1.0, "model.temperature=-1.0"),
    ("top_p", 1.5, "model.top_p=1.5"),
    ("top_p", 0.9, "model.top_p=0.9: GRPO training must sample"),
    ("beta", -0.1, "model.beta=-0.1"),
    ("reward", "accuracy", "model.reward='accuracy'"),
    ("clip_eps", 0.0, "model.clip_eps=0.0"),
    ("clip_eps_high", -0.1, "model.clip_eps_high=-0.1"),  # an upper bound below 1 would be silently wrong
    ("num_updates", 0, "model.num_updates=0"),
    ("tool_outage_rate", 1.5, "model.tool_outage_rate=1.5"),
    ("redraw", "always", "model.redraw='always'"),
])
def test_bad_options_fail_before_loading(option, value, message):
    """A bad value of a GRPO option raises at construction, naming the option; no model is loaded.
    (The options shared with SFT: tests/test_agent.py.)"""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GRPOModule(**{"model_name": "tiny", option: value})


def test_grpo_on_the_raw_smollm2_is_refused_before_loading():
    """SmolLM2 writes no tags without a cold start: fit without init_adapter fails at setup, naming both."""
    m = GRPOModule(model_name="smollm2-135m-instruct")
    with pytest.raises(ValueError, match="model.init_adapter=None"):
        m.setup("fit")
    assert m.policy is None

# --------------------------------------------------------------------------------------- learning


class _EasyReward(GRPOModule):
    """Reward 1 for writing `<answer>` and 1 more for `yes</answer>`: learnable from scratch."""

    def compute_rewards(self, ro, batch):
        r = torch.tensor([float("<answer>" in t) + float("yes</answer>" in t) for t in ro.texts])
        return r, {"tags": r}, r == 2


def test_grpo_learns_an_easy_reward():
    """The proof that the gradient has the right sign: the mean reward must clearly rise.

    Tiny random model, full fine-tuning, G=8, B=4, 30 steps. Measured: the first five steps
    average 0.037, the last five 0.419; with the advantage sign flipped by hand, 0.025 and 0.013
    (with `torch.multinomial` as the sampler, before 69dc5c6: 0.044 / 0.562, flipped 0.031 / 0.000),
    so this test fails on a sign error.
    """
    L.seed_everything(0)
    module = _EasyReward(model_name="tiny", lora=False, group_size=8, max_new_tokens=8, lr=3e-3,
                         warmup_ratio=0.0, beta=0.04)
    questions = [QAExample(id=str(i), question="Say yes.", answers=("yes",), kind=LOOKUP) for i in range(4)]
    record = fit(module, 30, questions=questions, batch_size=4)
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

    def step_optimizer(self):
        self.lrs.append(self.optimizers().param_groups[0]["lr"])
        super().step_optimizer()

    def rollout(self, *a, **kw):
        self.rollouts += 1
        return super().rollout(*a, **kw)

@pytest.mark.parametrize("num_updates", [1, 2])
def test_lr_of_every_update_follows_the_schedule(num_updates):
    """max_steps counts optimizer updates (μ per rollout): max_steps 4 with μ = 2 is 2 rollouts, and the
    LR used by update k is lr·cosine_with_warmup(k, 4, 0.25) = lr·(1, 1, 0.75, 0.25), ending at 0."""
    L.seed_everything(0)
    m = _LRs(model_name="tiny", group_size=2, max_new_tokens=4, lr=1e-3, warmup_ratio=0.25, num_updates=num_updates)
    trainer = fit(m, 4).trainer
    assert m.rollouts == 4 // num_updates and trainer.global_step == 4
    assert m.lrs == pytest.approx([1e-3 * f for f in (1.0, 1.0, 0.75, 0.25)])
    assert m.lrs == pytest.approx([1e-3 * cosine_with_warmup(k, 4, 0.25) for k in range(4)])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule's end


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
    fit(m, 4)
    assert max(abs(r - 1) for r in m.ratios) > 1e-2 and max(m.clip_fracs) > 0, (m.ratios, m.clip_fracs)


class _FreshCasts(_RandomReward):
    """After each update, inside the step's autocast region: the policy's log-probs against those of
    autocast's own casts made afresh (no cache, every module's own forward), max |Δ| per update; and how
    many linear layers use a weight cast once (`models.frozen_casts`) in the π_ref pass and the update."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gaps, self.cast_in_ref, self.cast_in_update = [], [], []

    def reference_logprobs(self, ro, micro=None):
        seen = []
        real = grpo.module.completion_logprobs

        def spied(model, *args):
            seen.append(len(cast_modules(model)))
            return real(model, *args)
        grpo.module.completion_logprobs = spied
        try:
            return super().reference_logprobs(ro, micro)
        finally:
            grpo.module.completion_logprobs = real
            self.cast_in_ref.append(seen)

    def policy_update(self, ro, *args):
        self.cast_in_update.append(len(cast_modules(self.policy)))
        out = super().policy_update(ro, *args)
        with torch.no_grad():
            now = grpo.logprobs.completion_logprobs(self.policy, ro, self.hparams.temperature)
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), own_forwards(self.policy):
                fresh = grpo.logprobs.completion_logprobs(self.policy, ro, self.hparams.temperature)
        self.gaps.append(float((now - fresh).abs().max()))
        return out


@pytest.mark.parametrize("lora", [True, False])
def test_updates_under_bf16_autocast_see_the_updated_weights(lora):
    """bf16-mixed, μ = 2, β > 0, LoRA (merged into fp32 weights for the fp32 rollout) and full fine-tuning: the
    whole training_step runs in one autocast region. After every update the log-probs equal those of
    autocast's own fresh casts: an autocast that kept its casts of the trainable weights for the region
    (`cache_enabled=True`; Lightning's disables it) would make update 2 score update 1's weights, and a
    frozen weight cast once that went stale would differ too. The frozen weights are cast once: LoRA's base
    layers (2 layers x 7 + the LM head) in π_ref's pass and the updates; under full fine-tuning none of the
    policy's (they train), the π_ref copy's in its pass. (With LoRA this step used to crash: the rollout's
    merge ran under autocast and gave bf16 weights.)"""
    L.seed_everything(0)
    m = _FreshCasts(model_name="tiny", lora=lora, lora_r=4, group_size=4, max_new_tokens=8, lr=5e-2,
                    warmup_ratio=0.0, num_updates=2, beta=0.1)
    fit(m, 4, precision="bf16-mixed")
    assert len(m.gaps) == 4 and max(m.gaps) == 0.0, m.gaps
    frozen = 7 * 2 + 1
    assert m.cast_in_update == [frozen if lora else 0] * 4
    assert m.cast_in_ref == [[frozen]] * 2, m.cast_in_ref  # one micro-batch per π_ref pass, two rollouts


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
    fit(m, 3)
    assert m.kls[-1] > 1e-4, m.kls
    ro = m.rollout([QAExample(id="a", question="Hi?", answers=("x",), kind=LOOKUP)], 0.7, 4)
    mask = ro.completion_mask.bool()
    with torch.no_grad():  # π_ref at the sampling temperature, like everything the loss scores
        ref, want, now = (m.reference_logprobs(ro), completion_logprobs(start, ro, 0.7),
                          completion_logprobs(m.policy, ro, 0.7))
    assert (now - want)[mask].abs().max() > 1e-3, "the policy did not move"
    torch.testing.assert_close(ref[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_first_update_ratio_is_one_at_the_sampling_temperature():
    """μ = 1, fp32, T = 0.7: at the first update π_θ is the policy that sampled, so ρ = π_θ/π_old is 1
    up to rounding on every token and nothing is clipped. Fails if the loss scores another temperature
    or other positions than the sampler did, or takes π_old from anything but the sampler."""
    L.seed_everything(0)
    m = _LastUpdate(model_name="tiny", group_size=4, max_new_tokens=12, temperature=0.7, lr=1e-3, clip_eps=1e-3)
    fit(m, 1)
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
    fit(raw, 2)
    clipped = _GradNorms(model_name="tiny", lora=False, group_size=4, max_new_tokens=8, max_grad_norm=1e-3, lr=1e-3)
    L.seed_everything(0)
    fit(clipped, 2)
    assert min(raw.norms) > 1e-3 and max(clipped.norms) <= 1e-3 * (1 + 1e-4), (raw.norms, clipped.norms)


class _OwnGradients(_RandomReward):
    """Checks that every optimizer step sees exactly the gradient of its own loss, the sum of its
    micro-batches' (nothing left over from the previous update: μ = 2 makes two updates per batch)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.errors, self.micro_batches, self._expected = [], [], None

    def accumulate_grad(self, loss, sync=True):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        self._expected = grads if self._expected is None else [e + g for e, g in zip(self._expected, grads)]
        self.micro_batches[-1] += 1
        super().accumulate_grad(loss, sync)

    def policy_update(self, *args):
        self.micro_batches.append(0)
        return super().policy_update(*args)

    def on_before_optimizer_step(self, optimizer):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.errors.append(max(float((p.grad - g).abs().max()) for p, g in zip(params, self._expected)))
        self._expected = None


@pytest.mark.parametrize("tokens_per_micro_batch", [100_000, 1])  # one micro-batch / one per group
def test_each_update_uses_only_its_own_gradient(tokens_per_micro_batch):
    L.seed_everything(0)
    m = _OwnGradients(model_name="tiny", group_size=4, max_new_tokens=8, num_updates=2, max_grad_norm=0.0, lr=1e-2,
                      loss_tokens_per_micro_batch=tokens_per_micro_batch)
    fit(m, 4)
    assert len(m.errors) == 4 and max(m.errors) < 1e-6, m.errors
    assert m.micro_batches == [1 if tokens_per_micro_batch > 1 else 2] * 4  # B = 2 groups


class _Spy(GRPOModule):
    """policy_update without a trainer: backward only (no optimizer step), each event recorded."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.events = []

    def accumulate_grad(self, loss, sync=True):
        self.events.append(("backward", sync))
        loss.backward()

    def step_optimizer(self):
        self.events.append(("step",))


def _update(m: _Spy, ro, tokens_per_micro_batch: int, old_logp, ref_logp, advantages):
    """(batch loss output, gradients, events) of one `policy_update` with this micro-batch budget."""
    import grpo.logprobs

    for p in m.policy.parameters():
        p.grad = None
    m.events = []
    real = grpo.module.completion_logprobs

    def spied(model, ro_mb, temperature):
        m.events.append(("forward", ro_mb.group_ids.unique().tolist()))
        return real(model, ro_mb, temperature)

    micro = grpo.logprobs.loss_micro_batches(ro, tokens_per_micro_batch)
    grpo.module.completion_logprobs = spied
    try:
        out = m.policy_update(ro, micro, old_logp, ref_logp, advantages, torch.ones(()))
    finally:
        grpo.module.completion_logprobs = real
    return out, {n: p.grad.clone() for n, p in m.policy.named_parameters() if p.requires_grad}, m.events


@pytest.mark.parametrize("token_level", [True, False])
def test_micro_batched_update_is_the_one_pass_update(token_level):
    """An update taken a micro-batch of groups at a time (forward, backward, next micro-batch) has the
    gradient and the loss outputs (loss, loss/policy, loss/kl, clip_frac, ratio_mean) of one pass over
    the batch: B = 3 groups of G = 4 on the tiny model with LoRA, π_old perturbed so that ratios differ
    from 1 and the clip acts, β > 0. A micro-batch normalised by its own token (or sequence) count
    instead of the batch's fails; so does a pass that is not split."""
    L.seed_everything(0)
    m = _Spy(model_name="tiny", lora_r=4, group_size=4, max_new_tokens=12, temperature=0.7, beta=0.1,
             clip_eps=0.1, token_level=token_level)
    m.env = lambda query: "nothing found"
    m.configure_model()
    with torch.no_grad():  # a fresh LoRA has B = 0: give the update weight
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    batch = [QAExample(id=str(i), question=q, answers=("x",), kind=LOOKUP)
             for i, q in enumerate(["Hi?", "What is the capital of France?", "Name a colour."])]
    ro = m.rollout(batch, temperature=0.7, group_size=4)
    g = torch.Generator().manual_seed(0)
    old_logp = ro.sample_logp + 0.3 * torch.randn(ro.sample_logp.shape, generator=g)    # (N, C)
    advantages = torch.randn(len(ro.texts), generator=g)                                # (N,)
    ref_logp = m.reference_logprobs(ro)                                                 # (N, C) in one pass

    one, one_grads, one_events = _update(m, ro, 100_000, old_logp, ref_logp, advantages)
    assert one_events == [("forward", [0, 1, 2]), ("backward", True), ("step",)]
    split, split_grads, events = _update(m, ro, 1, old_logp, ref_logp, advantages)      # one group per micro-batch
    assert events == [("forward", [0]), ("backward", False), ("forward", [1]), ("backward", False),
                      ("forward", [2]), ("backward", True), ("step",)]
    assert 0 < float(one.clip_frac) < 1 and abs(float(one.ratio_mean) - 1) > 1e-3 and float(one.kl) > 0
    for name in ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean"):
        torch.testing.assert_close(getattr(split, name), getattr(one, name), atol=1e-7, rtol=1e-6, msg=name)
    for name, grad in one_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    # the reference pass in micro-batches gives the same log-probs as in one
    torch.testing.assert_close(m.reference_logprobs(ro, grpo.logprobs.loss_micro_batches(ro, 1)), ref_logp,
                               atol=1e-6, rtol=1e-6)


LOG_1_25 = math.log(1.25)
K3_ROW0, K3_ROW1 = 0.8 + LOG_1_25 - 1, 2 - math.log(2) - 1  # k3 = e^d - d - 1, d = ref - logp: 0.0231436, 0.3068528


def _fixed_logp_update(monkeypatch, **options):
    """One `policy_update` whose log-probs are a leaf θ, so its loss is a function of known numbers.

    N = 2 samples (G = 2), C = 2 columns; row 0 has 2 sampled tokens, row 1 one (then padding).
    π_old = π_ref = 0 in log space, Â = (+1, −1), θ = [[log 1.25, log 1.25], [log 0.5, pad]], so the
    ratios are 1.25, 1.25 | 0.5. The module's options: ε_low = 0.1, ε_high = 0.28, β = 0.5, T = 0.7."""
    m = _Spy(model_name="tiny", group_size=2, temperature=0.7, clip_eps=0.1, clip_eps_high=0.28, beta=0.5, **options)
    ro = fake_rollout(["a", "b"], tokens=[2, 1], G=2)                                    # masks [[1, 1], [1, 0]]
    theta = torch.tensor([[LOG_1_25, LOG_1_25], [math.log(0.5), 0.0]], requires_grad=True)
    temperatures = []

    def fixed(model, ro_mb, temperature):
        temperatures.append(temperature)
        return theta * 1.0                                                                # (N, C), graph to θ
    monkeypatch.setattr(grpo.module, "completion_logprobs", fixed)
    zeros = torch.zeros(2, 2)
    out = m.policy_update(ro, [torch.arange(2)], zeros, zeros, torch.tensor([1.0, -1.0]), torch.ones(()))
    assert temperatures == [0.7]
    return out, theta.grad


def test_policy_update_applies_the_modules_clip_range_and_beta_token_level(monkeypatch):
    """The module's ε_low, ε_high and β reach the loss (the loss functions are tested alone in
    tests/test_losses.py; this is the plumbing). Per token, loss = max(−Â r, −Â clip(r, 0.9, 1.28)):
      row 0, Â = +1, r = 1.25 < 1.28: −1.25, not clipped (ε_high = ε_low = 0.1 would give −1.1)
      row 1, Â = −1, r = 0.5 < 0.9:   +0.9, clipped      (the default ε = 0.2 would give +0.8)
    token mean (M = 3): pg = (−1.25 − 1.25 + 0.9) / 3 = −0.53333, kl = (2 k3₀ + k3₁) / 3 = 0.11771,
    loss = pg + 0.5 kl = −0.47448 (β = 0 would give −0.53333), clip_frac 1/3.
    dloss/dθ: row 0 −Â r / 3 + β (1 − e^d) / 3 = (−1.25 + 0.1) / 3; row 1 (clipped: no policy gradient)
    β (1 − 2) / 3 = −0.5 / 3; padding 0."""
    out, grad = _fixed_logp_update(monkeypatch, token_level=True)
    assert out.policy_loss.item() == pytest.approx(-1.6 / 3, abs=1e-6)
    assert out.kl.item() == pytest.approx((2 * K3_ROW0 + K3_ROW1) / 3, abs=1e-6)
    assert out.loss.item() == pytest.approx(-1.6 / 3 + 0.5 * (2 * K3_ROW0 + K3_ROW1) / 3, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(1 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.15 / 3, -1.15 / 3], [-0.5 / 3, 0.0]]))


def test_policy_update_applies_the_modules_per_sequence_mean(monkeypatch):
    """`token_level: false` reaches the loss: each row's mean, then the mean over N' = 2 rows:
    pg = ((−1.25 − 1.25) / 2 + 0.9) / 2 = −0.175 (token mean: −0.53333), kl = (k3₀ + k3₁) / 2."""
    out, _ = _fixed_logp_update(monkeypatch, token_level=False)
    assert out.policy_loss.item() == pytest.approx(-0.175, abs=1e-6)
    assert out.kl.item() == pytest.approx((K3_ROW0 + K3_ROW1) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.175 + 0.5 * (K3_ROW0 + K3_ROW1) / 2, abs=1e-6)


class _OneRightInFour(GRPOModule):
    """Rewards (1, 0, 0, 0) in every group of G = 4; records the advantages each update is given."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.advantages = []

    def compute_rewards(self, ro, batch):
        r = torch.tensor([1.0, 0.0, 0.0, 0.0] * (len(ro.texts) // 4))
        return r, {"fixed": r}, r > 0

    def policy_update(self, ro, micro, old_logp, ref_logp, advantages, token_scale):
        self.advantages.append(advantages.clone())
        return super().policy_update(ro, micro, old_logp, ref_logp, advantages, token_scale)


@pytest.mark.parametrize("scale_by_std, expected", [
    (False, [0.75, -0.25, -0.25, -0.25]),                       # Dr. GRPO: r − mean, mean 1/4
    (True, [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]),  # sample std of (1, 0, 0, 0) = 0.5, + ε 1e-4
])
def test_training_step_applies_the_modules_scale_by_std(scale_by_std, expected):
    L.seed_everything(0)
    m = _OneRightInFour(model_name="tiny", group_size=4, max_new_tokens=4, beta=0.0, lr=1e-3, warmup_ratio=0.0,
                        scale_by_std=scale_by_std)
    fit(m, 1)
    assert m.advantages[0].tolist() == pytest.approx(expected * 2, abs=1e-5)            # B = 2 groups


@pytest.mark.parametrize("redraw", ["split", "direct_right"])
def test_training_step_picks_redraws_by_the_modules_rule(redraw, monkeypatch):
    """Step 7 asks `split_groups` about the step's calls, and passes the answers' correctness only under
    model.redraw=direct_right (here (1, 0, 0, 0) in each of the B = 2 groups of G = 4)."""
    seen = []

    def record(calls, G, correct):
        seen.append((calls.numel(), G, None if correct is None else correct.tolist()))
        return torch.zeros(calls.numel() // G, dtype=torch.bool)

    monkeypatch.setattr(grpo.module, "split_groups", record)
    L.seed_everything(0)
    fit(_OneRightInFour(model_name="tiny", group_size=4, max_new_tokens=4, beta=0.0, lr=1e-3, warmup_ratio=0.0,
                        redraw=redraw), 1)
    assert seen == [(8, 4, None if redraw == "split" else [True, False, False, False] * 2)]

# --------------------------------------------------------------------------------------- the reward of each sample


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


def test_nan_reward_names_the_sample_and_the_component(monkeypatch):
    """GRPOModule.compute_rewards stops on a NaN component, naming `<question id>#<sample>` and the key."""
    module = GRPOModule(model_name="tiny", group_size=4)
    real = grpo.module.voi_reward
    calls = []

    def voi_with_a_nan(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(args)
        if len(calls) == 6:                       # sample 5 = question q1, its sample #1
            parts["correct"] = math.nan
        return parts

    monkeypatch.setattr(grpo.module, "voi_reward", voi_with_a_nan)
    with pytest.raises(ValueError, match=r"reward component 'correct' of sample q1#1 \(index 5\) is nan"):
        module.compute_rewards(fake_rollout(["<answer>Paris</answer>"] * 8, G=4), BATCH)
    monkeypatch.setattr(grpo.module, "voi_reward", real)
    rewards, parts, _ = module.compute_rewards(fake_rollout(["<answer>Paris</answer>"] * 8, G=4), BATCH)
    assert rewards.tolist() == pytest.approx([1.2] * 8) and set(parts) == {
        "correct", "format", "tool_cost", "no_obs_penalty", "direct_bonus", "guess_penalty", "ungrounded_penalty"}


def test_ungrounded_penalty_reads_each_samples_own_text_and_question():
    """compute_rewards grounds sample n in batch[n // G].question: with ungrounded_direct -0.6, for France
    a direct "Paris" its thought states earns 1.2, and "France" stated in the thought is ungrounded (the
    question's own word: -0.4 - 0.6); for Kenya a searched "Nairobi" 1.05 (no penalty), a direct one
    its thought does not state 0.6."""
    module = GRPOModule(model_name="tiny", group_size=2, voi_weights=VOIWeights(ungrounded_direct=-0.6))
    batch = [BATCH[0], QAExample(id="k", question="What is the capital of Kenya?", answers=("Nairobi",), kind=LOOKUP)]
    texts = ["<thought>The capital of France is Paris.</thought><answer>Paris</answer>",
             "<thought>The capital of France is Paris.</thought><answer>France</answer>",
             "<call>Kenya</call><obs>[Kenya] capital Nairobi</obs><answer>Nairobi</answer>",
             "<thought>Kenya is in East Africa.</thought><answer>Nairobi</answer>"]
    rewards, parts, correct = module.compute_rewards(fake_rollout(texts, calls=[0, 0, 1, 0], G=2), batch)
    assert parts["ungrounded_penalty"].tolist() == pytest.approx([0.0, -0.6, 0.0, -0.6])
    assert rewards.tolist() == pytest.approx([1.2, -1.0, 1.05, 0.6])
    assert correct.tolist() == [True, False, True, True]


def test_infinite_reward_weight_is_caught_through_the_otc_reward():
    """OTC with alpha = inf: the correct sample's term is inf and a wrong one's inf * 0 = NaN."""
    module = GRPOModule(model_name="tiny", group_size=2, reward="otc", otc_weights=OTCWeights(alpha=math.inf))
    texts = ["<answer>Lyon</answer>", "<answer>Paris</answer>", "<answer>Paris</answer>", "<answer>x</answer>"]
    with pytest.raises(ValueError, match=r"component 'correct' of sample q0#0 \(index 0\) is nan"):
        module.compute_rewards(fake_rollout(texts, G=2), BATCH)

# --------------------------------------------------------------------------------------- the token-level loss under DDP


def test_ddp_token_scale_by_hand():
    # T_r = 3 and 1 tokens, W = 2: T = 4, scales 3*2/4 = 1.5 and 1*2/4 = 0.5 (they sum to W)
    scales = ddp_token_scale(torch.tensor([3.0, 1.0]), torch.tensor(4.0), 2)
    assert scales.tolist() == [1.5, 0.5]
    assert ddp_token_scale(torch.tensor(5.0), torch.tensor(10.0), 2).item() == 1.0   # equal counts: 1
    assert ddp_token_scale(torch.tensor(0.0), torch.tensor(0.0), 2).item() == 0.0    # no tokens anywhere: 0, not NaN


def test_ddp_token_scale_makes_the_gradient_average_the_global_token_mean():
    """Two simulated ranks with 5 and 1 completion tokens: averaging the ranks' gradients (what DDP
    does) of the rescaled local token means gives the gradient of the token mean over both ranks'
    tokens; without the rescaling it does not (the one token of rank 1 would weigh 5 times more)."""
    theta = torch.tensor(0.5, requires_grad=True)
    a = [torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 9.0, 9.0]]), torch.tensor([[10.0, 7.0, 7.0, 7.0]])]
    m = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 0, 0, 0]])]      # (N_r, C): T_r = 5, 1
    x = [theta ** 2 * a_r for a_r in a]                                                  # per-token losses
    T = sum(m_r.sum() for m_r in m).float()
    want, = torch.autograd.grad(masked_mean_tokens(torch.cat(x), torch.cat(m)), theta, retain_graph=True)

    def ddp_grad(scaled: bool):
        grads = []
        for x_r, m_r in zip(x, m):
            s = ddp_token_scale(m_r.sum().float(), T, 2) if scaled else 1.0
            grads.append(torch.autograd.grad(masked_mean_tokens(x_r, m_r) * s, theta, retain_graph=True)[0])
        return sum(grads) / 2                                                            # DDP: mean over ranks

    # by hand: Σ a over unmasked tokens = 1+2+3+4+5 + 10 = 25, T = 6, d/dθ θ² = 2θ = 1 -> 25/6
    assert want.item() == pytest.approx(25 / 6)
    assert ddp_grad(scaled=True).item() == pytest.approx(25 / 6)
    assert ddp_grad(scaled=False).item() == pytest.approx((15 / 5 + 10 / 1) / 2)  # 6.5: not the token mean

# --------------------------------------------------------------------------------------- training through faults


class FlakyEnv:
    """Call 1 raises, call 2 hangs past the timeout, call 3 returns 5 MB; every other call answers."""

    def __init__(self):
        self.calls, self.release = 0, threading.Event()

    def __call__(self, query: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("search backend down")
        if self.calls == 2:
            self.release.wait(60)
            return "too late"
        if self.calls == 3:
            return "x" * 5_000_000
        return "[Paris] Paris is the capital of France."


def test_training_goes_on_through_failing_tools(monkeypatch):
    """Two GRPO steps with a tool that raises, hangs and floods on its first three calls: the three
    samples get error observations and are counted in tool_errors (and in tools/errors_per_sample),
    the other samples get real observations, and both steps train with a finite loss."""
    monkeypatch.setattr(grpo.agent, "rollout", functools.partial(rollout, tool_timeout=0.3))
    env = FlakyEnv()
    module = _module()
    before = _trainable(module)
    try:
        record = fit(module, 2, env, FRANCE, bias={"<call>": 6.0, "</call>": 6.0})
    finally:
        env.release.set()
    assert env.calls > 3, "the set-up needs healthy calls after the faulty ones"
    errors = torch.cat([o["rollout"].tool_errors for o in record.outputs])                 # (2N,)
    texts = [t for o in record.outputs for t in o["rollout"].texts]
    assert int(errors.sum()) == 3
    for err, text in zip(errors.tolist(), texts):
        assert ("Tool error" in text or "<obs>" + "x" * 32 + "</obs>" in text) == bool(err)
    assert sum("[Paris]" in t for t in texts) >= 1
    for o, m in zip(record.outputs, record.metrics):
        assert math.isfinite(float(o["loss"]))
        assert m["tools/errors_per_sample"] == pytest.approx(o["rollout"].tool_errors.float().mean().item())
    after = _trainable(module)
    assert len(after) == len(before) and any(not torch.equal(b, a) for b, a in zip(before, after)), "no update"


def test_tool_outages_take_the_tool_from_a_share_of_the_training_questions():
    """`tool_outage_rate`: that share of the training questions (drawn from seed, step, rank and index:
    the same draw again for the same step) get a tool that finds nothing; 0 keeps the real tool."""
    def tool(query):
        return "[France] Its capital is Paris."

    def outages(module, n):
        module.env = tool
        return [e is not tool for e in module.training_envs(n)]

    assert outages(_module(), 50) == [False] * 50
    module = _module(tool_outage_rate=1.0)
    module.env = tool
    assert [e("Kenya") for e in module.training_envs(3)] == ["No results for 'Kenya'."] * 3
    down = outages(_module(tool_outage_rate=0.25), 400)
    assert 70 <= sum(down) <= 130  # 100 expected, binomial sd 8.7
    assert outages(_module(tool_outage_rate=0.25), 400) == down
    assert outages(_module(tool_outage_rate=0.25, seed=1), 400) != down


def test_training_rollouts_meet_the_outage_evaluation_the_real_tool():
    """With every training question's tool down, each training call gets the empty-search observation
    (and the step logs tools/outage_share = 1); the evaluation rollout still calls the real tool."""
    module = _module(tool_outage_rate=1.0)
    record = fit(module, 2, lambda q: "[France] Its capital is Paris.", FRANCE, bias={"<call>": 6.0, "</call>": 6.0})
    texts = [t for o in record.outputs for t in o["rollout"].texts]
    observations = [t.split("<obs>")[1].split("</obs>")[0] for t in texts if "<obs>" in t]
    assert len(observations) >= 4 and all(o.startswith("No results for '") for o in observations)
    assert [m["tools/outage_share"] for m in record.metrics] == [1.0, 1.0]
    ro = module.rollout(FRANCE[:1], temperature=1.0, group_size=4)
    assert any("<obs>[France] Its capital is Paris." in t for t in ro.texts)


class ConstantReward(GRPOModule):
    """Every sample gets -0.45 (VOI: wrong after one call): every group has zero spread. In float32
    the mean of three -0.45 is not exactly -0.45, so (r - mean) / (std + eps) is ~3e-4, not 0,
    unless zero-spread groups are set to 0 (grpo.losses.group_advantages)."""

    def compute_rewards(self, ro, batch):
        r = torch.full((len(ro.texts),), -0.45)
        return r, {"constant": r}, torch.zeros(len(ro.texts), dtype=torch.bool)


def test_all_equal_rewards_give_zero_advantages_and_leave_the_weights_unchanged():
    """β = 0 and every advantage 0: the loss is exactly 0 (no NaN from the zero std) and AdamW moves
    nothing (zero gradients, no weight decay), though the completions have real lengths."""
    L.seed_everything(0)
    module = ConstantReward(model_name="tiny", group_size=3, max_new_tokens=12, beta=0.0, lr=1e-2, warmup_ratio=0.0)
    before = _trainable(module)
    record = fit(module, 2, lambda q: "nothing", FRANCE)
    for o, m in zip(record.outputs, record.metrics):
        assert float(o["loss"]) == 0.0 and m["loss/total"] == 0.0
        assert m["reward/frac_zero_std"] == 1.0 and m["reward/std"] == pytest.approx(0.0, abs=1e-6)  # rounding
        assert o["rollout"].completion_mask.sum() > 6 * 4, "completions must have real lengths"
    after = _trainable(module)
    assert len(after) == len(before) and all(torch.equal(b, a) for b, a in zip(before, after))


def test_empty_completions_just_eos_train_with_finite_values():
    """The model says EOS at once: one sampled token per completion, reward finite (-1: no answer,
    malformed), not truncated, loss finite."""
    record = fit(_module(), 1, lambda q: "nothing", FRANCE, bias={EOS: 30.0})
    (o,), (m,) = record.outputs, record.metrics
    ro = o["rollout"]
    assert ro.texts == [EOS] * 8 and ro.num_generated.tolist() == [1] * 8
    assert ro.completion_mask.sum(1).tolist() == [1] * 8 and not ro.truncated.any()
    assert o["rewards"].tolist() == pytest.approx([-1.0] * 8)
    assert math.isfinite(float(o["loss"])) and m["rollout/tokens_per_sample"] == 1.0


def test_completions_that_hit_the_token_budget_without_an_answer():
    """No EOS, no <answer>: every completion runs to max_new_tokens, is marked truncated, and still
    gets a finite reward (its calls still count) and a finite loss."""
    record = fit(_module(max_new_tokens=12), 1, lambda q: "nothing", FRANCE,
                  bias={EOS: -1e4, "<answer>": -1e4, "</answer>": -1e4, "<call>": 2.0, "</call>": 2.0})
    (o,), (m,) = record.outputs, record.metrics
    ro = o["rollout"]
    assert ro.truncated.all() and ro.num_generated.tolist() == [12] * 8
    assert all(parse_completion(t).answer is None for t in ro.texts)
    assert torch.isfinite(o["rewards"]).all() and (o["rewards"] <= -1.0).all()
    assert math.isfinite(float(o["loss"])) and m["rollout/truncated_frac"] == 1.0
