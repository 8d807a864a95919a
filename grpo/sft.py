"""Cold start: supervised fine-tuning on synthetic tool-use traces, so the model speaks the format.

SmolLM2-135M-Instruct writes no `<answer>`/`<call>` tags on its own (0/96 samples), so every
GRPO group would get equal rewards and no gradient. A short SFT on traces in exactly the
rollout's format fixes that (the "phase 1" of the seed project; DeepSeek-R1's cold start).

Tokenization mirrors the rollout token for token: the prompt is the same `build_prompt`, the
model's own segments are encoded on their own, and each observation is encoded as
`<obs>` + result (cut to `max_obs_tokens`) + `</obs>`, exactly as `grpo.rollout` forces it.
The loss is the token-level cross-entropy on the assistant's own tokens only (its segments
and the final EOS); prompt and observation tokens are context, with label -100.

GRPO then starts from the SFT adapter (`model.init_adapter`): it is merged into the base
weights, fresh LoRA adapters are added, and the reference policy of the KL term is the
merged network with those adapters disabled, i.e. the SFT policy, not the raw base model.
"""
from __future__ import annotations

import torch

from data.traces import Trace
from envs.protocol import build_prompt, encode_observation
from grpo.agent import AgentModule

IGNORE = -100  # label of tokens without loss


def tokenize_trace(tokenizer, trace: Trace, max_obs_tokens: int = 160,
                   max_tool_calls: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + assistant turn; labels are IGNORE on prompt and observations.

    max_tool_calls: when set (model.show_budget), the k-th observation ends with the budget note
    of max_tool_calls - k searches left, as the rollout writes it.
    """
    ids = tokenizer.encode(build_prompt(tokenizer, trace.question), add_special_tokens=False)
    labels = [IGNORE] * len(ids)
    calls = 0
    for role, text in trace.segments:
        if role == "model":
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece
        elif role == "obs":
            calls += 1
            calls_left = None if max_tool_calls is None else max_tool_calls - calls
            piece = encode_observation(tokenizer, text, max_obs_tokens, calls_left)
            ids += piece
            labels += [IGNORE] * len(piece)
        else:
            raise ValueError(f"trace {trace.id!r}: unknown segment role {role!r} (expected 'model' or 'obs')")
    ids.append(tokenizer.eos_token_id)  # the model learns to stop
    labels.append(tokenizer.eos_token_id)
    return ids, labels


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest; the attention mask comes from lengths (pad id == EOS id)."""
    L = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), L), pad_id, dtype=torch.long)   # (B, L)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)      # (B, L)
    attention_mask = torch.zeros((len(examples), L), dtype=torch.long)     # (B, L)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy: token t predicts label t+1; IGNORE labels carry no loss.

    logits (B, L, V), labels (B, L) -> scalar mean over the supervised tokens of the batch.
    """
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


class SFTModule(AgentModule):
    """The cold start: next-token cross-entropy on traces. Its options are all `AgentModule`'s (the
    sampling and evaluation ones apply to its evaluation rollouts; `init_adapter` continues an SFT
    from an earlier adapter)."""

    def training_step(self, batch: list[Trace], batch_idx: int):
        if not batch or not isinstance(batch[0], Trace):
            raise ValueError("SFTModule trains on traces: set data.traces (a .jsonl path; made if missing)")
        # 1. tokenize exactly as the rollout will see it; labels only on the model's own tokens
        hp = self.hparams
        budget = hp.max_tool_calls if hp.show_budget else None  # observations as the rollout writes them
        enc = collate_sft([tokenize_trace(self.tokenizer, t, hp.max_obs_tokens, budget) for t in batch],
                          self.tokenizer.pad_token_id)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        # 2. next-token cross-entropy on those tokens
        logits = self.policy(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, L, V)
        loss = sft_loss(logits, enc["labels"])
        # 3. update (and one step of the LR schedule)
        self.accumulate_grad(loss)
        self.step_optimizer()
        n_tokens = (enc["labels"] != IGNORE).sum()
        self.log_dict({"sft/loss": loss.detach(), "sft/tokens_per_batch": n_tokens.float()}, batch_size=len(batch))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(batch))
        return loss.detach()
