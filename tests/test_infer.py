"""Inference: a scripted model (no weights) checks the single-sequence agentic loop and each of
its safety stops; the tiny Llama checks that a PEFT adapter and a Lightning checkpoint load back
with the logits they were saved with; `main` runs end to end. Shapes: T tokens, V vocab."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import grpo.infer as infer
from envs.protocol import BUDGET_OBSERVATION, build_prompt
from grpo.infer import STOP_REASONS, answer, load_for_inference, main, read_questions, transcript
from models.loading import add_lora, load_model_and_tokenizer
from models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = "<|im_end|>"
QUESTION = "What is the population of Kenya?"
ENV_TEXT = "Kenya has 51,393,010 people."
PROMPT_LEN = len(TOK.encode(build_prompt(TOK, QUESTION)))

# --------------------------------------------------------------------------------------- scripted model


class ScriptedLM(nn.Module):
    """Mimics the HF causal-LM call of `answer` for one sequence. Its next token is script[k], where k
    counts the tokens fed after the prompt outside <obs>...</obs> (the ones it sampled); EOS once the
    script is exhausted. Records every (token, position) it was fed."""

    def __init__(self, script: str, max_positions: int = 2048):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # `answer` reads the device from here
        self.script = TOK.encode(script)
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.fed, self.prompt_len, self.calls = [], 0, 0
        self.obs_open, self.obs_close = TOK.convert_tokens_to_ids("<obs>"), TOK.convert_tokens_to_ids("</obs>")

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, logits_to_keep=0):
        assert use_cache and logits_to_keep == 1 and input_ids.shape[0] == 1
        if cache is None:  # prefill
            self.fed, self.prompt_len = [], input_ids.shape[1]
        assert attention_mask.shape[1] == len(self.fed) + input_ids.shape[1], "mask covers cache + new tokens"
        self.fed += list(zip(input_ids[0].tolist(), position_ids[0].tolist()))
        self.calls += 1
        k, inside = 0, False
        for t, _ in self.fed[self.prompt_len:]:
            inside = (inside or t == self.obs_open) and t != self.obs_close
            k += not inside and t != self.obs_close
        logits = torch.zeros(1, 1, len(TOK))                                           # (1, 1, V)
        logits[0, -1, self.script[k] if k < len(self.script) else TOK.eos_token_id] = 1e4
        return SimpleNamespace(logits=logits, cache="kv")


class Env:
    def __init__(self):
        self.queries = []

    def __call__(self, query: str) -> str:
        self.queries.append(query)
        return ENV_TEXT


def run(script: str, max_positions: int = 2048, **limits):
    model, env = ScriptedLM(script, max_positions), Env()
    return answer(model, TOK, env, QUESTION, **limits), model, env


def n_tokens(text: str) -> int:
    return len(TOK.encode(text))

# --------------------------------------------------------------------------------------- the loop


def test_direct_answer():
    """Stops at </answer> (the rest of the script is never sampled); no tool call."""
    r, _, env = run("<thought>I know it.</thought><answer>51 million</answer>junk")
    assert r.text == "<thought>I know it.</thought><answer>51 million</answer>"
    assert (r.answer, r.stop_reason, r.calls, r.tokens) == ("51 million", "answer", 0, n_tokens(r.text))
    assert env.queries == [] and not r.unclosed_call and r.context_tokens == PROMPT_LEN + r.tokens


def test_tool_call_feeds_observation_once():
    """After </call> the env runs and <obs>result</obs> follows, not counted as sampled tokens; every
    token is fed exactly once, at consecutive positions (the KV cache is kept across the tool turn)."""
    r, model, env = run(f"<call>Kenya population</call><answer>51,393,010</answer>")
    obs = f"<obs>{ENV_TEXT}</obs>"
    assert r.text == f"<call>Kenya population</call>{obs}<answer>51,393,010</answer>"
    assert (r.answer, r.stop_reason, r.calls, r.queries) == ("51,393,010", "answer", 1, ["Kenya population"])
    assert env.queries == ["Kenya population"] and r.tokens == n_tokens(r.text) - n_tokens(obs)
    full = TOK.encode(build_prompt(TOK, QUESTION)) + TOK.encode(r.text)
    assert [t for t, _ in model.fed] == full[:-1]                 # the last sampled token is never fed
    assert [p for _, p in model.fed] == list(range(len(full) - 1))
    assert model.calls == r.tokens                                # prefill + one forward per later step


def test_max_tool_calls():
    """Past max_tool_calls the call gets the budget notice (as in training) and the env is not called."""
    r, _, env = run("<call>q1</call><call>q2</call><call>q3</call><answer>a</answer>", max_tool_calls=1)
    assert env.queries == ["q1"] and r.calls == 1 and r.queries == ["q1"]
    assert r.text.count(f"<obs>{BUDGET_OBSERVATION}</obs>") == 2 and r.stop_reason == "answer"


def test_stuck_stops_a_loop_but_not_varied_text():
    """One token repeated: stop "stuck" as soon as the 50-token window fills, far before the budget.
    Varied text longer than the window is not stuck."""
    r, _, _ = run("<thought>" + "a" * 500, max_new_tokens=1000, max_step_tokens=1000)
    assert r.stop_reason == "stuck" and r.tokens == 50
    pangram = "The quick brown fox jumps over the lazy dog. "
    r, _, _ = run(f"<thought>{pangram * 4}</thought><answer>x</answer>", max_new_tokens=1000, max_step_tokens=1000)
    assert r.stop_reason == "answer" and r.tokens > 150


def test_context_limit():
    """Stop when prompt + completion reach context_fraction of the window; a prompt already past it
    is not even run."""
    r, _, _ = run("<thought>" + "abcdefghij" * 10, max_positions=2 * (PROMPT_LEN + 20), context_fraction=0.5)
    assert r.stop_reason == "context" and r.context_tokens == PROMPT_LEN + 20 and r.tokens == 20
    r, model, _ = run("<answer>x</answer>", max_positions=PROMPT_LEN)
    assert r.stop_reason == "context" and r.tokens == 0 and r.text == "" and model.calls == 0


def test_unclosed_answer_is_recovered():
    """An <answer> never closed (EOS, or the budget) still gives its text as the answer."""
    r, _, _ = run(f"<thought>ok</thought><answer>Nairobi{EOS}")
    assert (r.stop_reason, r.answer) == ("eos", "Nairobi")
    r, _, _ = run("<answer>Nairobi is the capital", max_new_tokens=9)
    assert (r.stop_reason, r.answer) == ("budget", "Nairobi")


def test_step_budget_is_per_segment():
    """max_step_tokens bounds the sampled tokens between tool calls, not the total; a call left open
    at the budget is not run and is marked."""
    script = "<call>q</call>abcdef<answer>x</answer>"              # segments of 3 and 9 sampled tokens
    r, _, _ = run(script, max_step_tokens=10)
    assert r.stop_reason == "answer" and r.tokens == 12 and r.answer == "x"
    r, _, _ = run(script, max_step_tokens=5)
    assert r.stop_reason == "budget" and r.tokens == 3 + 5 and r.answer is None
    r, _, env = run("<thought>hm</thought><call>never closed, goes on and on", max_step_tokens=12)
    assert (r.stop_reason, r.tokens, r.calls, r.unclosed_call, env.queries) == ("budget", 12, 0, True, [])
    with pytest.raises(ValueError, match="--max-step-tokens=0"):
        run(script, max_step_tokens=0)


def test_transcript_shows_calls_and_observations():
    r, _, _ = run("<thought>look up</thought><call>Kenya population</call><answer>51,393,010</answer>")
    out = transcript(QUESTION, r, width=12)
    assert out.splitlines()[0] == f"Q: {QUESTION}"
    assert '→ search("Kenya population")' in out and "← Kenya has 5…" in out and ENV_TEXT not in out
    assert "<thought>look up</thought>" in out and "A: 51,393,010" in out
    assert "stop: answer" in out and "calls: 1" in out

# --------------------------------------------------------------------------------------- loading


def _perturb_lora(model) -> None:
    """LoRA's B starts at zero (a no-op adapter): give the adapters weights that change the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits                                             # (1, T, V)


def test_adapter_folder_roundtrip(tmp_path):
    base, tok = load_model_and_tokenizer("tiny")
    policy = add_lora(base, r=4, alpha=8, target_modules=("q_proj", "v_proj")).eval()
    _perturb_lora(policy)
    policy.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tok.encode(build_prompt(tok, QUESTION))])                      # (1, T)
    loaded, _ = load_for_inference(str(tmp_path / "adapter"), "tiny")
    assert not any("lora_" in n for n, _ in loaded.named_parameters())                  # merged: plain Linears
    torch.testing.assert_close(_logits(loaded, ids), _logits(policy, ids))
    with policy.disable_adapter():
        assert not torch.allclose(_logits(policy, ids), _logits(loaded, ids), atol=1e-3)  # the adapter matters
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_for_inference(str(tmp_path), "tiny")


def test_lightning_checkpoint_roundtrip(tmp_path):
    """A checkpoint as GRPOModule writes it (hparams + trainable policy.* weights only) rebuilds the policy."""
    from grpo.module import GRPOModule

    module = GRPOModule(model_name="tiny", lora_r=4, lora_alpha=8, lora_targets=("q_proj", "v_proj"))
    module.configure_model()
    _perturb_lora(module.policy)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all(k.startswith("policy.") and "lora_" in k for k in ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, tok = load_for_inference(str(tmp_path / "last.ckpt"))
    assert not any("lora_" in n for n, _ in loaded.named_parameters())                  # merged: plain Linears
    ids = torch.tensor([tok.encode(build_prompt(tok, QUESTION))])                      # (1, T)
    torch.testing.assert_close(_logits(loaded, ids), _logits(module.policy.eval(), ids))

    ckpt["state_dict"]["policy.bogus.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="bogus"):
        load_for_inference(str(tmp_path / "bad.ckpt"))
    with pytest.raises(ValueError, match="--model"):
        load_for_inference(str(tmp_path / "last.ckpt"), "smollm2-135m-instruct")

# --------------------------------------------------------------------------------------- CLI


def test_main_query_prints_transcript(capsys):
    """The tiny random model over the offline task's real search env."""
    main(["--model", "tiny", "--query", "What is the capital of Kenya?", "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert out.startswith("Q: What is the capital of Kenya?") and "\nA: " in out
    assert any(f"[stop: {s} " in out for s in STOP_REASONS)


def test_main_batch_writes_jsonl(tmp_path, monkeypatch):
    monkeypatch.setattr(infer, "build_env", lambda task, data: Env())
    questions = tmp_path / "q.txt"
    questions.write_text("What is the capital of Kenya?\n\nOn which continent is Peru?\n")
    out = tmp_path / "answers.jsonl"
    main(["--model", "tiny", "--file", str(questions), "--out", str(out), "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["What is the capital of Kenya?", "On which continent is Peru?"]
    for r in rows:
        assert {"question", "answer", "calls", "tokens", "stop_reason", "transcript"} <= set(r)
        assert r["stop_reason"] in STOP_REASONS and 1 <= r["tokens"] <= 8


def test_bad_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "ok?"}\n{"q": "no field"}\n')
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--file", str(bad)])                 # fails before any model loads
    assert f"{bad}:2" in capsys.readouterr().err
    bad.write_text('{"question": "ok?"}\n\n{not json\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:3: not valid JSON"):
        read_questions(bad)
    with pytest.raises(ValueError, match="--file"):
        read_questions(tmp_path / "q.csv")
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--query", "hi", "--top-p", "2"])
    assert "--top-p=2.0" in capsys.readouterr().err
