"""Faults, one layer at a time: tools that raise, hang or flood; rewards that are equal, NaN or
infinite; empty and truncated completions; megabytes of malformed output; bad data and bad
options (an error naming the file, the field or the option, before the model loads); the
token-level loss under DDP as a pure function. The real-process faults (SIGKILL, two ranks) are
in tests/test_kill_resume.py and tests/test_ddp.py.

Shapes: B prompts, G group size, N = B*G samples, C completion tokens, V vocabulary.
"""
from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

import grpo.module
import grpo.agent
from data.datamodule import QADataModule
from data.types import LOOKUP, QAExample
from envs.protocol import parse_completion
from envs.sandbox import OVERSIZED_CHARS, run_tool
from grpo.cli import main
from grpo.losses import masked_mean_tokens
from grpo.module import GRPOModule, ddp_token_scale
from grpo.agent import gather_eval_rows
from grpo.rewards import OTCWeights, judge, otc_group_rewards, voi_reward
from grpo.rollout import OBS_CHARS_PER_TOKEN, rollout
from models.tokenizer import ByteTokenizer
from tests.test_data import ROWS, _without, write_jsonl
from tests.run_helpers import REPO
from tests.test_rewards import any_text
from tests.test_rollout import ENV_TEXT, ScriptedLM, completion

TOK = ByteTokenizer()
EOS = TOK.eos_token

# ============================================================================== failing tools


class FaultyEnv:
    """The query decides: "boom" raises, "hang" blocks until released, "huge" returns 5 MB of text,
    anything else gets ENV_TEXT."""

    def __init__(self):
        self.release = threading.Event()

    def __call__(self, query: str) -> str:
        if query == "boom":
            raise ConnectionError("search backend down")
        if query == "hang":
            self.release.wait(60)
            return "too late"
        if query == "huge":
            return "x" * 5_000_000
        return ENV_TEXT


@pytest.fixture
def faulty_env():
    env = FaultyEnv()
    yield env
    env.release.set()  # let the abandoned thread finish


def test_run_tool_turns_each_failure_into_a_short_observation(faulty_env):
    assert run_tool(faulty_env, "ok") == (ENV_TEXT, False)
    assert run_tool(faulty_env, "boom") == ("Tool error: ConnectionError", True)
    t0 = time.perf_counter()
    assert run_tool(faulty_env, "hang", timeout=0.2) == ("Tool error: timeout", True)
    assert time.perf_counter() - t0 < 2.0
    text, failed = run_tool(faulty_env, "huge", max_chars=400)
    assert (text, failed) == ("x" * 400, True)
    assert run_tool(lambda q: "y" * (OVERSIZED_CHARS - 1), "q", max_chars=10) == ("y" * 10, False)  # only cut
    assert run_tool(lambda q: "<answer>a</answer>", "q", timeout=None) == ("‹answer>a‹/answer>", False)


def test_a_hung_tool_call_does_not_keep_the_process_alive():
    """The abandoned call's thread is a daemon: the interpreter exits at once (a ThreadPoolExecutor
    worker would be joined at exit, i.e. never)."""
    code = ("import time; from envs.sandbox import run_tool; "
            "print(run_tool(lambda q: time.sleep(3600), 'q', timeout=0.1))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip() == "('Tool error: timeout', True)", out.stderr[-2000:]
    assert time.perf_counter() - t0 < 60


class CountingTokenizer(ByteTokenizer):
    """Records the length of every text it encodes."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def encode(self, text, add_special_tokens=False):
        self.lengths.append(len(text))
        return super().encode(text, add_special_tokens)


def test_failing_tools_only_affect_their_own_samples(faulty_env):
    """B=2 prompts, G=3: samples 0, 1, 2 call a tool that raises, hangs, floods; samples 3-5 are the
    same with a healthy tool. Each faulty sample gets a short observation, is counted in
    tool_errors and goes on to its answer; samples 3-5 are token for token what a rollout with a
    healthy env gives; no megabyte string is ever tokenized."""
    scripts = [f"<thought><call>{q}</call><answer>a{i}</answer>" for i, q in enumerate(["boom", "hang", "huge"])]
    scripts += ["<thought><call>fine</call><answer>b</answer>", "<thought><answer>c</answer>",
                "<thought><call>also fine</call><call>again</call><answer>d</answer>"]
    max_obs_tokens = 32

    def run(env, tokenizer):
        return rollout(ScriptedLM(scripts, 3), tokenizer, ["Q1", "Q2"], env, group_size=3, max_new_tokens=64,
                       max_obs_tokens=max_obs_tokens, generator=torch.Generator().manual_seed(0), tool_timeout=0.3)

    tok = CountingTokenizer()
    t0 = time.perf_counter()
    r = run(faulty_env, tok)
    assert time.perf_counter() - t0 < 10
    healthy = run(lambda q: ENV_TEXT, TOK)

    assert r.tool_errors.tolist() == [1, 1, 1, 0, 0, 0]
    assert r.num_calls.tolist() == healthy.num_calls.tolist() == [1, 1, 1, 1, 0, 2]
    observations = [t.split("<obs>")[1].split("</obs>")[0] for t in r.texts[:3]]
    assert observations == ["Tool error: ConnectionError", "Tool error: timeout", "x" * max_obs_tokens]
    for i in range(3):
        assert r.texts[i].endswith(f"</obs><answer>a{i}</answer>"), "the faulty sample must go on to its answer"
    for i in range(3, 6):
        assert completion(r, i) == completion(healthy, i) and r.texts[i] == healthy.texts[i]
        n = len(completion(r, i))
        assert torch.equal(r.completion_mask[i, :n], healthy.completion_mask[i, :n])
    assert max(tok.lengths) <= OBS_CHARS_PER_TOKEN * max_obs_tokens


class Biased(nn.Module):
    """The tiny model with some token logits shifted (+ makes a token likely, - forbids it)."""

    def __init__(self, model, bias: dict[str, float]):
        super().__init__()
        self.model = model
        b = torch.zeros(len(TOK))                                                    # (V,)
        for token, value in bias.items():
            b[TOK.convert_tokens_to_ids(token)] = value
        self.register_buffer("bias", b)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits + self.bias                                          # (rows, T, V)
        return out


class _Record(L.Callback):
    def __init__(self):
        self.outputs, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


QUESTIONS = [QAExample(id=f"q{i}", question="What is the capital of France?", answers=("Paris",), kind=LOOKUP)
             for i in range(8)]


def _trainable(module) -> list[torch.Tensor]:
    """Copies of the policy's trainable weights (the policy is built first if needed)."""
    module.configure_model()
    return [p.detach().clone() for p in module.policy.parameters() if p.requires_grad]


def _fit(module: GRPOModule, env, bias: dict[str, float] | None = None, steps: int = 1) -> _Record:
    """`steps` training steps of B=2 questions on the tiny model (its logits shifted by `bias`)."""
    module.configure_model()
    if bias:
        module.policy = Biased(module.policy, bias)
    module.env = env
    record = _Record()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, DataLoader(QUESTIONS, batch_size=2, collate_fn=lambda b: b))
    assert trainer.global_step == steps
    return record


def _module(**kwargs) -> GRPOModule:
    L.seed_everything(0)
    options = dict(model_name="tiny", group_size=4, max_new_tokens=16, max_obs_tokens=32, beta=0.0, lr=1e-2,
                   warmup_ratio=0.0)
    return GRPOModule(**(options | kwargs))


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
        record = _fit(module, env, bias={"<call>": 6.0, "</call>": 6.0}, steps=2)
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

# ============================================================================== numerical guards


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
    record = _fit(module, lambda q: "nothing", steps=2)
    for o, m in zip(record.outputs, record.metrics):
        assert float(o["loss"]) == 0.0 and m["loss/total"] == 0.0
        assert m["reward/frac_zero_std"] == 1.0 and m["reward/std"] == pytest.approx(0.0, abs=1e-6)  # rounding
        assert o["rollout"].completion_mask.sum() > 6 * 4, "completions must have real lengths"
    after = _trainable(module)
    assert len(after) == len(before) and all(torch.equal(b, a) for b, a in zip(before, after))


def test_empty_completions_just_eos_train_with_finite_values():
    """The model says EOS at once: one sampled token per completion, reward finite (-1: no answer,
    malformed), not truncated, loss finite."""
    record = _fit(_module(), lambda q: "nothing", bias={EOS: 30.0})
    (o,), (m,) = record.outputs, record.metrics
    ro = o["rollout"]
    assert ro.texts == [EOS] * 8 and ro.num_generated.tolist() == [1] * 8
    assert ro.completion_mask.sum(1).tolist() == [1] * 8 and not ro.truncated.any()
    assert o["rewards"].tolist() == pytest.approx([-1.0] * 8)
    assert math.isfinite(float(o["loss"])) and m["rollout/tokens_per_sample"] == 1.0


def test_completions_that_hit_the_token_budget_without_an_answer():
    """No EOS, no <answer>: every completion runs to max_new_tokens, is marked truncated, and still
    gets a finite reward (its calls still count) and a finite loss."""
    record = _fit(_module(max_new_tokens=12), lambda q: "nothing",
                  bias={EOS: -1e4, "<answer>": -1e4, "</answer>": -1e4, "<call>": 2.0, "</call>": 2.0})
    (o,), (m,) = record.outputs, record.metrics
    ro = o["rollout"]
    assert ro.truncated.all() and ro.num_generated.tolist() == [12] * 8
    assert all(parse_completion(t).answer is None for t in ro.texts)
    assert torch.isfinite(o["rewards"]).all() and (o["rewards"] <= -1.0).all()
    assert math.isfinite(float(o["loss"])) and m["rollout/truncated_frac"] == 1.0


def _fake_rollout(texts, group_size, calls=None):
    n = len(texts)
    calls = calls or [0] * n
    return SimpleNamespace(texts=texts, group_size=group_size, num_calls=torch.tensor(calls),
                           num_calls_no_obs=torch.zeros(n, dtype=torch.long))


BATCH = [QAExample(id=f"q{b}", question="Capital of France?", answers=("Paris",), kind=LOOKUP) for b in range(2)]


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
        module.compute_rewards(_fake_rollout(["<answer>Paris</answer>"] * 8, 4), BATCH)
    monkeypatch.setattr(grpo.module, "voi_reward", real)
    rewards, parts, _ = module.compute_rewards(_fake_rollout(["<answer>Paris</answer>"] * 8, 4), BATCH)
    assert rewards.tolist() == pytest.approx([1.2] * 8) and set(parts) == {
        "correct", "format", "tool_cost", "no_obs_penalty", "direct_bonus"}


def test_infinite_reward_weight_is_caught_through_the_otc_reward():
    """OTC with alpha = inf: the correct sample's term is inf and a wrong one's inf * 0 = NaN."""
    module = GRPOModule(model_name="tiny", group_size=2, reward="otc", otc_weights=OTCWeights(alpha=math.inf))
    texts = ["<answer>Lyon</answer>", "<answer>Paris</answer>", "<answer>Paris</answer>", "<answer>x</answer>"]
    with pytest.raises(ValueError, match=r"component 'correct' of sample q0#0 \(index 0\) is nan"):
        module.compute_rewards(_fake_rollout(texts, 2), BATCH)

# ============================================================================== malformed output


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(any_text, min_size=1, max_size=6), golds=st.lists(st.sampled_from(["Paris", "53 million"])
                                                                         | st.text(max_size=8), max_size=3),
       calls=st.data(), alpha=st.floats(0.0, 5.0), c=st.floats(0.1, 10.0))
def test_otc_rewards_are_finite_and_bounded(texts, golds, calls, alpha, c):
    """total = correct + format with 0 <= correct <= alpha and format in {malformed, well_formed};
    tool_factor in [0, 1]."""
    w = OTCWeights(alpha=alpha, c=c)
    num_calls = calls.draw(st.lists(st.integers(0, 8), min_size=len(texts), max_size=len(texts)))
    correct, well_formed = zip(*(judge(t, golds) for t in texts))
    for r in otc_group_rewards(correct, well_formed, num_calls, w):
        assert all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r["tool_factor"] <= 1.0 and -1e-12 <= r["correct"] <= alpha + 1e-12
        assert r["format"] in (w.well_formed, w.malformed)
        lo, hi = min(w.malformed, w.well_formed), alpha + max(w.malformed, w.well_formed)
        assert lo - 1e-12 <= r["total"] <= hi + 1e-12


@pytest.mark.parametrize("text", [
    "<thought><answer><call>" * 100_000,                 # nested openings, never closed
    "<call>q</call><obs>" * 60_000,                      # every observation left open
    "</answer></call></obs>" * 60_000,                   # stray closing tags only
    "<answer>x</answer>" * 60_000,                       # 60k answers
    "<call>" + "a" * 1_000_000,                          # one unclosed call, a megabyte query
    "<answer>" + "Paris " * 200_000 + "<|im_end|>" * 50_000,  # unclosed megabyte answer, end markers
], ids=["nested", "open-obs", "stray-closes", "many-answers", "long-call", "long-answer"])
def test_megabyte_malformed_outputs_are_scored_fast(text):
    """parse_completion and both rewards stay linear on megabytes of nested or unclosed tags."""
    t0 = time.perf_counter()
    p = parse_completion(text)
    correct, well_formed = judge(text, ["Paris"])
    voi = voi_reward(correct, well_formed, 0, 0)
    (otc,) = otc_group_rewards([correct], [well_formed], [0])
    assert time.perf_counter() - t0 < 5.0  # quadratic behaviour would take minutes
    assert not p.well_formed and voi["format"] == -0.5 and otc["format"] == -0.5
    assert all(math.isfinite(v) for v in (*voi.values(), *otc.values()))

# ============================================================================== token-level loss under DDP


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

# ============================================================================== bad data


def _cli_error(args: list[str], error=ValueError, match: str = ""):
    with pytest.raises(error, match=match):
        main(["-c", "configs/tiny.yaml", *args], run=False)


def test_bad_data_options_through_the_cli_name_the_option(tmp_path):
    """Parsing the CLI builds the datamodule: these fail there, before any weights load."""
    _cli_error(["--data.task", "squad"], match=r"data.task='squad'")
    _cli_error(["--data.task", "hotpotqa"], match=r"data.train_path is required")
    missing = str(tmp_path / "missing.jsonl")
    _cli_error(["--data.task", "hotpotqa", "--data.train_path", missing], FileNotFoundError,
               match=re.escape(f"data.train_path={missing!r}: no such file"))
    good = str(write_jsonl(tmp_path / "train.jsonl", ROWS))
    _cli_error(["--data.task", "hotpotqa", "--data.train_path", good, "--data.val_path", missing],
               FileNotFoundError, match=r"data.val_path=.*missing.jsonl': no such file")
    _cli_error(["--data.batch_size", "0"], match=r"data.batch_size=0")
    _cli_error(["--data.train_limit", "0"], match=r"data.train_limit=0")
    _cli_error(["--data.val_limit", "-3"], match=r"data.val_limit=-3")


def _hotpot(tmp_path, train_rows=ROWS, **kwargs) -> QADataModule:
    return QADataModule(task="hotpotqa", train_path=str(write_jsonl(tmp_path / "train.jsonl", train_rows)), **kwargs)


def test_bad_data_files_fail_in_setup_naming_file_line_and_field(tmp_path):
    dm = _hotpot(tmp_path, [ROWS[0], _without(ROWS[1], "answer")])
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: missing required field 'answer'"):
        dm.setup()
    text = tmp_path / "train.txt"
    text.write_text(json.dumps(ROWS[0]))
    with pytest.raises(ValueError, match=r"train\.txt: expected a \.json or \.jsonl file"):
        QADataModule(task="hotpotqa", train_path=str(text)).setup()
    empty_val = tmp_path / "val.jsonl"
    empty_val.write_text("\n")
    with pytest.raises(ValueError, match=r"val\.jsonl: no HotpotQA examples found"):  # an empty split
        _hotpot(tmp_path, val_path=str(empty_val)).setup()


def test_bad_traces_files_fail_in_setup(tmp_path):
    bad = tmp_path / "traces.jsonl"
    bad.write_text(json.dumps({"id": "t1"}) + "\n")
    with pytest.raises(ValueError, match=r"traces\.jsonl, line 1: missing field"):
        QADataModule(traces=str(bad)).setup()
    bad.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.traces=.*traces\.jsonl': the file holds no trace"):
        QADataModule(traces=str(bad)).setup()
    # (a missing file is made from the task's training split: tests/test_data.py)


def test_bad_data_stops_fit_before_the_model_loads(tmp_path):
    """Lightning calls the datamodule's setup before `configure_model`: no weights are loaded."""
    dm = _hotpot(tmp_path, [ROWS[0], {**ROWS[1], "context": "not paragraphs"}])
    module = GRPOModule(model_name="tiny", group_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: field 'context'"):
        trainer.fit(module, dm)
    assert module.policy is None


def test_batch_larger_than_the_training_split_names_data_batch_size(tmp_path):
    dm = _hotpot(tmp_path, batch_size=3)  # 2 training questions
    with pytest.raises(ValueError, match=r"data.batch_size=3 x 1 device\(s\) is more than the 2 training items"):
        dm.setup()


def test_batch_larger_than_the_training_split_fails_before_the_model_loads(tmp_path):
    module = GRPOModule(model_name="tiny", group_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"data.batch_size=3"):
        trainer.fit(module, _hotpot(tmp_path, batch_size=3))
    assert module.policy is None

# ============================================================================== bad options


@pytest.mark.parametrize("option, value", [
    ("lr", 0.0), ("warmup_ratio", 1.0), ("clip_eps", 0.0), ("num_updates", 0), ("max_obs_tokens", 0),
    ("max_tool_calls", -1), ("lora_r", 0), ("lora_alpha", 0), ("eval_temperature", -0.5), ("eval_top_p", 0.0),
])
def test_more_bad_options_fail_before_loading(option, value):
    """Options tests/test_module.py does not cover: a ValueError naming `model.<option>=<value>`."""
    with pytest.raises(ValueError, match=rf"model\.{option}={value!r}"):
        GRPOModule(model_name="tiny", **{option: value})


def test_bad_model_option_through_the_cli():
    _cli_error(["--model.init_args.lr=-1e-3"], match=r"model.lr=-0.001")


@pytest.mark.parametrize("args", [
    {"clip_eps_high": -0.1},         # clamp(ratio, 1 - ε, 1 + ε_high) with an upper bound below 1: silently wrong
    {"max_grad_norm": -1.0},         # reaches Lightning's gradient clipping at the first step
    {"weight_decay": -0.1},          # AdamW raises in configure_optimizers, after the model loads
    {"lora_dropout": 1.5},           # nn.Dropout raises while the adapters are added (model loaded)
    {"eval_max_new_tokens": 0},      # `0 or max_new_tokens`: silently the training budget
], ids=lambda a: next(iter(a)))
def test_unchecked_options_should_fail_at_construction(args):
    """Gaps: these bad values are accepted by the constructor and fail late (or never)."""
    (name, value), = args.items()
    with pytest.raises(ValueError, match=rf"model\.{name}="):
        GRPOModule(model_name="tiny", **args)
