"""Cold start: supervised fine-tuning on synthetic tool-use traces, so the model speaks the format.

SmolLM2-135M-Instruct writes no `<answer>`/`<call>` tags on its own (0/96 samples), so every
GRPO group would get equal rewards and no gradient. A short SFT on traces in exactly the
rollout's format fixes that (the "phase 1" of the seed project; DeepSeek-R1's cold start).

Tokenization mirrors the rollout token for token: the prompt is the same `build_prompt`, the
model's own segments are encoded on their own, and each observation is encoded as
`<obs>` + result (cut to `max_obs_tokens`) + `</obs>`, exactly as `grpo.rollout` forces it.
The loss is the token-level cross-entropy on the assistant's own tokens only (its segments
and the final EOS); prompt and observation tokens are context, with label -100.

The fork (`fork_target: base`). A recall thought forks at its fact token: "The capital of Uganda is|
Kampala." (answer) or "... is| not something I know; I will search for Uganda." (search). Trained on
the trace's own token there, the cold start learns a certainty the base model never had: after one
epoch it puts 0.85 on " not" after "The planet known as the Red Planet is", where the base model puts
0.01 (and 0.10 on " Mars"; T = 1, results/economy/experiments.md). With `fork_target: base`
the target at that one position is the base model's own distribution with every token that does not
start the fact moved onto the hedge:

    q(f) = p_base(f) for each fact first token f,   q(" not") = 1 - sum_f p_base(f),   q = 0 elsewhere

so the cold start hedges exactly as often as the base model would not have stated the fact, and the
choice to search stays tied to what the model knows (p_base: the policy with its LoRA adapters off,
i.e. the model the SFT started from, at temperature 1). Every other position keeps its one-hot label.
Measured (section "The fork's target from the base model"): in the trained domain it does what it says;
on questions unlike the training ones it hedges as much as the one-hot target, so the default stays "trace".

GRPO then starts from the SFT adapter (`model.init_adapter`): it is merged into the base
weights, fresh LoRA adapters are added, and the reference policy of the KL term is the
merged network with those adapters disabled, i.e. the SFT policy, not the raw base model.
"""
from __future__ import annotations

import torch

from data.thoughts import HEDGE, fork_offset
from data.traces import Trace
from envs.protocol import build_prompt, encode_observation
from grpo.agent import AgentModule
from models.loading import reference_policy
from models.tokenizer import continuation_ids, first_token

IGNORE = -100  # label of tokens without loss
FORK_TARGETS = ("trace", "base")  # SFTModule.fork_target
Forks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # rows (K,), label positions (K,), targets (K, V)


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


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, forks: Forks | None = None) -> torch.Tensor:
    """Token-level cross-entropy: token t predicts label t+1; IGNORE labels carry no loss.

    logits (B, L, V), labels (B, L) -> scalar mean over the supervised tokens of the batch.
    forks: (rows (K,), positions (K,), targets (K, V)): at label position positions[k] of row rows[k]
    the loss is the cross-entropy against the distribution targets[k], -sum_v q_v log p_v, instead of
    against the label (which must be supervised there); the mean is over the same tokens.
    """
    B, L, V = logits.shape
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE, reduction="none").view(B, L - 1)  # (B, L-1)
    supervised = labels[:, 1:] != IGNORE                                                        # (B, L-1)
    if forks is not None:
        rows, positions, targets = forks
        if not supervised[rows, positions - 1].all():
            raise ValueError("a fork target sits on a position without a label")
        logp = torch.log_softmax(logits[rows, positions - 1].float(), dim=-1)                  # (K, V)
        ce = ce.index_put((rows, positions - 1), -(targets * logp).sum(-1))
    return ce.sum() / supervised.sum()


def trace_fork(tokenizer, trace: Trace) -> tuple[int, list[int], int] | None:
    """Where the trace's first thought forks, in the ids of `tokenize_trace`: (position of the fork
    token, the distinct first tokens of the gold answers there, the hedge's first token), or None when
    the thought has no fork (`data.thoughts.fork_offset`), the fork falls inside a token, or a fact
    starts with the hedge's token."""
    if not trace.segments or trace.segments[0][0] != "model":
        return None
    text = trace.segments[0][1]
    cut = fork_offset(text, trace.answers)
    if cut is None:
        return None
    head = text[:cut]
    try:
        before, _ = continuation_ids(tokenizer, head, text[cut:])   # the segment's ids start with `before`
        facts = sorted({first_token(tokenizer, head, " " + a) for a in trace.answers if a})
        hedge = first_token(tokenizer, head, HEDGE)
    except ValueError:
        return None
    if hedge in facts:
        return None
    prompt = tokenizer.encode(build_prompt(tokenizer, trace.question), add_special_tokens=False)
    return len(prompt) + len(before), facts, hedge


def fork_target(base_logits: torch.Tensor, facts: list[int], hedge: int) -> torch.Tensor:
    """The target at a fork: q(f) = p_base(f) on each fact first token f, q(hedge) = 1 - sum_f p_base(f),
    0 elsewhere (p_base = softmax of `base_logits`, temperature 1). base_logits (V,) -> q (V,)."""
    p = torch.softmax(base_logits.float(), dim=-1)                          # (V,)
    q = torch.zeros_like(p)
    q[facts] = p[facts]
    q[hedge] = 1.0 - p[facts].sum()
    return q


@torch.no_grad()
def base_fork_targets(base, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      forks: list[tuple[int, int, list[int], int]]) -> Forks:
    """`sft_loss`'s forks from one forward of the base model over the rows that fork, cut after the
    last fork. forks: (row, position, fact ids, hedge id) per forking trace; input_ids (B, L)."""
    rows = torch.tensor([f[0] for f in forks], device=input_ids.device)
    positions = torch.tensor([f[1] for f in forks], device=input_ids.device)
    end = int(positions.max())                           # logits at position - 1 predict the fork token
    logits = base(input_ids=input_ids[rows, :end], attention_mask=attention_mask[rows, :end]).logits  # (K, end, V)
    targets = torch.stack([fork_target(logits[k, pos - 1], facts, hedge)
                           for k, (_, pos, facts, hedge) in enumerate(forks)])                       # (K, V)
    return rows, positions, targets


class SFTModule(AgentModule):
    """The cold start: next-token cross-entropy on traces. Besides `fork_target`, its options are all
    `AgentModule`'s (the sampling and evaluation ones apply to its evaluation rollouts; `init_adapter`
    continues an SFT from an earlier adapter)."""

    def __init__(self, fork_target: str = "trace", **kwargs):
        """
        Args:
            fork_target: the target at the fork of each trace's first thought: "trace" (its own token,
                one-hot) or "base" (the base model's probability of the fact kept, the rest on the hedge:
                the module docstring; needs LoRA, whose adapters switched off give the base model).
        """
        super().__init__(**kwargs)
        if fork_target not in FORK_TARGETS:
            raise ValueError(f"fork_target={fork_target!r}: expected one of {FORK_TARGETS}")
        if fork_target == "base" and not self.hparams.lora:
            raise ValueError("fork_target='base' needs lora: true (the base model is the policy with its "
                             "adapters off; full fine-tuning keeps no copy of it)")

    def training_step(self, batch: list[Trace], batch_idx: int):
        if not batch or not isinstance(batch[0], Trace):
            raise ValueError("SFTModule trains on traces: set data.traces (a .jsonl path; made if missing)")
        loss, logs = self.batch_loss(batch)  # steps 1-3
        # 4. update (and one step of the LR schedule)
        self.accumulate_grad(loss)
        self.step_optimizer()
        self.log_dict({"sft/loss": loss.detach(), **logs}, batch_size=len(batch))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(batch))
        return loss.detach()

    def batch_loss(self, batch: list[Trace]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The SFT loss of a batch of traces, and what to log beside it."""
        # 1. tokenize exactly as the rollout will see it; labels only on the model's own tokens
        hp = self.hparams
        budget = hp.max_tool_calls if hp.show_budget else None  # observations as the rollout writes them
        enc = collate_sft([tokenize_trace(self.tokenizer, t, hp.max_obs_tokens, budget) for t in batch],
                          self.tokenizer.pad_token_id)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        logs = {"sft/tokens_per_batch": (enc["labels"] != IGNORE).sum().float()}
        # 2. (fork_target "base") the target at each thought's fork, from the base model
        forks = None
        if hp.fork_target == "base":
            found = [(i, *fork) for i, t in enumerate(batch) if (fork := trace_fork(self.tokenizer, t)) is not None]
            logs["sft/fork_share"] = torch.tensor(len(found) / len(batch))
            if found:
                with reference_policy(self.policy) as base:
                    forks = base_fork_targets(base, enc["input_ids"], enc["attention_mask"], found)
                facts = [f[2] for f in found]
                logs["sft/fork_fact_mass"] = torch.stack([q[ids].sum() for q, ids in zip(forks[2], facts)]).mean()
        # 3. next-token cross-entropy on those tokens (against the fork targets at the forks)
        logits = self.policy(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, L, V)
        return sft_loss(logits, enc["labels"], forks), logs
