"""Test doubles shared by several test files (no tests in here).

    fake_rollout(texts, ...)  a `Rollout` of given completions and counts, without a model
"""
from __future__ import annotations

from typing import Sequence

import torch

from grpo.rollout import Rollout


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
