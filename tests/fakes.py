"""Test doubles and sample data shared by several test files (no tests in here).

    fake_rollout(texts, ...)   a `Rollout` of given completions and counts, without a model
    Biased(model, bias)        a model (byte tokenizer) with some token logits shifted
    FaultyEnv                  a search tool that raises, hangs or floods, by query
    KENYA                      a well-formed completion with one call (gold "53 million")
    HOTPOTQA_ROWS              two HotpotQA records in the row format; write_jsonl, without
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from grpo.rollout import Rollout
from models.tokenizer import ByteTokenizer

ENV_TEXT = "Paris is the capital of France."
KENYA = ("<thought>I need the population.</thought><call>Kenya</call>"
         "<obs>[Kenya] Kenya has 53 million people.</obs><answer>53 million</answer>")

# --------------------------------------------------------------------------------------- rollouts


def fake_rollout(texts: Sequence[str], calls: Sequence[int] | None = None, no_obs: Sequence[int] | None = None,
                 incomplete: Sequence[int] | None = None, tokens: Sequence[int] | None = None,
                 G: int = 1, prompt_length: int = 3) -> Rollout:
    """The N = len(texts) completions as a `Rollout`: what rewards, metrics and callbacks read.

    calls, no_obs, incomplete: per-sample counts (default 0); tokens: sampled tokens per sample
    (default 1), which set the completion mask; G: group size (sample n answers question n // G)."""
    N = len(texts)
    counts = lambda xs: torch.tensor([0] * N if xs is None else list(xs))  # noqa: E731
    tokens = list(tokens) if tokens is not None else [1] * N
    C = max(tokens)
    completion_mask = (torch.arange(C)[None, :] < torch.tensor(tokens)[:, None]).long()          # (N, C)
    return Rollout(input_ids=torch.zeros(N, prompt_length + C, dtype=torch.long),
                   attention_mask=torch.ones(N, prompt_length + C, dtype=torch.long),
                   completion_mask=completion_mask, sample_logp=torch.zeros(N, C), prompt_length=prompt_length,
                   group_ids=torch.arange(N) // G, num_calls=counts(calls), num_calls_no_obs=counts(no_obs),
                   incomplete_calls=counts(incomplete), tool_errors=counts(None), num_generated=torch.tensor(tokens),
                   truncated=torch.zeros(N, dtype=torch.bool), texts=list(texts), queries=[[] for _ in texts])

# --------------------------------------------------------------------------------------- tools


class FaultyEnv:
    """The query decides: "boom" raises, "hang" blocks until `release` is set, "huge" returns 5 MB of
    text, anything else gets ENV_TEXT. Set `release` when done (the `faulty_env` fixture does)."""

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

# --------------------------------------------------------------------------------------- data files

HOTPOTQA_ROWS = [
    {"id": "q1", "question": "Which band did the singer of Song X found?", "answer": "Band Y",
     "type": "bridge", "level": "easy",
     "supporting_facts": [["Song X", 1], ["Band Y", 0], ["Song X", 0]],
     "context": [["Band Y", [" Band Y is a band.", " It was founded by Ann."]],
                 ["Song X", ["Song X is a song.", " It is sung by Ann."]]]},
    {"id": "q2", "question": "Is A older than B?", "answer": "yes", "type": "comparison", "level": None,
     "supporting_facts": [["A", 0]], "supporting_titles": ["B", "A"],
     "context": [["A", ["A was born in 1900."]], ["B", ["B was born in 1950."]],
                 ["Song X", ["Song X is a song.", "It is sung by Ann."]]]},  # same text, other spacing
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def without(row: dict, field: str) -> dict:
    return {k: v for k, v in row.items() if k != field}


class Biased(nn.Module):
    """A model of the byte tokenizer with some token logits shifted (+ makes a token likely, - forbids
    it): the tiny random model then writes tags, so that calls and answers happen."""

    def __init__(self, model, bias: dict[str, float]):
        super().__init__()
        self.model = model
        tok = ByteTokenizer()
        b = torch.zeros(len(tok))                                                    # (V,)
        for token, value in bias.items():
            b[tok.convert_tokens_to_ids(token)] = value
        self.register_buffer("bias", b)

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits + self.bias                                          # (rows, T or 1, V)
        return out
