"""Per-token log-probabilities of the completion tokens: log π(o_t | q, o_<t).

Only completion positions get vocabulary-sized logits (`logits_to_keep`): for a prompt of P
tokens and a completion of C, the model returns C+1 logit rows instead of P+C. The
log-softmax runs in fp32, one sample at a time, with the sampling temperature (PITFALLS:
the loss must see the distribution that sampled the tokens, trl #4159).
"""
from __future__ import annotations

import torch
from torch import Tensor

from grpo.rollout import Rollout, position_ids_from_mask


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[target] per position, in fp32. logits (N, C, V), targets (N, C) -> (N, C)."""
    rows = []
    for row_logits, row_targets in zip(logits, targets):           # one sample at a time: (C, V)
        logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)  # (C, V) fp32
        rows.append(logp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))  # (C,)
    return torch.stack(rows)                                        # (N, C)


def completion_logprobs(model, ro: Rollout, temperature: float = 1.0) -> Tensor:
    """log π(o_t | ·) for every completion position of a rollout: (N, C).

    Positions that are not sampled tokens (observations, padding) get values too; the
    completion mask removes them later.
    """
    C = ro.completion_mask.shape[1]
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                position_ids=position_ids_from_mask(ro.attention_mask), logits_to_keep=C + 1)
    logits = out.logits[:, :-1]                                     # (N, C, V): row t predicts token P+t
    if temperature <= 0:  # greedy sampling has no density; score with the plain softmax
        temperature = 1.0
    return token_logprobs(logits, ro.completion_ids, temperature)  # (N, C)
