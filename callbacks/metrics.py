"""`ToolMetrics`: when does the policy search, and does searching pay? Plus sample transcripts.

Per training step, over the N = B*G completions, overall and per question kind: the search rate,
incomplete calls, tool productivity (Σ correct / Σ calls), and per kind the calls, sampled tokens
and mean reward: `tools/…`, `rollout/<kind>/…`, `reward/<kind>/…`. The formulas are
`grpo.metrics.tool_metrics`'s (the table of every metric is `grpo/metrics.py`'s docstring);
correctness is what `GRPOModule.compute_rewards` judged (`outputs["correct"]`), so the metric means
the same under the VOI and the OTC reward and no completion is parsed again.

Distributed training: every rank sees different questions, so a ratio must be a ratio of
global sums, not a mean of per-rank ratios (which `sync_dist=True` would give, and a rank with
no lookup question would log nothing and leave the others waiting in the all-reduce). Each rank
therefore builds the same fixed vector of sums (every kind of `data.types.KINDS`, zeros when
absent), `strategy.reduce(..., "sum")` adds them up, and the ratios are computed from the global
sums; they are then equal on every rank and rank 0 hands them to the loggers itself, at the step
of the batch (through `log_dict`, Lightning would re-send a metric absent from a batch, e.g. the
memory kind's, with its last value at every later step of the epoch). (A torchmetrics
`MeanMetric` logged on step would show its local `forward` value, not a synced one.)

Every `transcript_every_n_steps` training batches (at 0, n, 2n, ... on the scalars' x-axis), rank 0
writes `num_transcripts` completions to TensorBoard as markdown text under `transcripts/train`:
question, gold answers, the completion with its observations, the reward and its components.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from data.types import QAExample
from grpo.metrics import GROUPS, QUANTITIES, step_sums, tool_metrics
from grpo.rollout import Rollout

# ---------------------------------------------------------------------------------------------
# Pure helpers: the x-axis step, transcripts


def logger_step(trainer: L.Trainer) -> int:
    """The x-axis value Lightning gives this batch's scalars: training batches done so far
    (`_batches_that_stepped`, private; `global_step` counts optimizer steps, μ per batch here)."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def transcript_indices(num_prompts: int, group_size: int, k: int) -> list[int]:
    """k sample indices, spread over questions: the first sample of each group, then the second, ..."""
    order = [b * group_size + g for g in range(group_size) for b in range(num_prompts)]
    return order[:k]


def _fenced(text: str) -> str:
    """A markdown code block that shows `text` verbatim (tags included), whatever backticks it holds."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def transcript_markdown(rollout: Rollout, batch: Sequence[QAExample], group_size: int, indices: Sequence[int],
                        rewards: torch.Tensor | None = None,
                        components: dict[str, torch.Tensor] | None = None) -> str:
    """Markdown of the completions `indices`: header line, question and golds, then the completion."""
    blocks = []
    for n in indices:
        ex = batch[n // group_size]
        head = f"**sample {n}** (question {n // group_size}, {ex.kind})"
        if rewards is not None:
            parts = ", ".join(f"{k} {float(v[n]):+.3f}" for k, v in (components or {}).items())
            head += f" · reward **{float(rewards[n]):+.3f}**" + (f" ({parts})" if parts else "")
        head += (f" · calls {int(rollout.num_calls[n])} (no obs {int(rollout.num_calls_no_obs[n])}, "
                 f"incomplete {int(rollout.incomplete_calls[n])})"
                 f" · sampled tokens {int(rollout.completion_mask[n].sum())}")
        qa = f"id:       {ex.id}\nquestion: {ex.question}\ngold:     {' | '.join(ex.answers)}"
        blocks.append(f"{head}\n\n{_fenced(qa)}\n\n{_fenced(rollout.texts[n])}")
    return "\n\n---\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# The callback


class ToolMetrics(L.Callback):
    """Logs the `tools/…`, `rollout/<kind>/…`, `reward/<kind>/…` metrics above and sample transcripts.

    Reads what `GRPOModule.training_step` returns: {"rollout", "correct", "rewards", "components", ...};
    other modules (SFT) return no rollout and are skipped.
    """

    def __init__(self, transcript_every_n_steps: int = 50, num_transcripts: int = 2):
        """
        Args:
            transcript_every_n_steps: log transcripts when the logging step is a multiple of n (0, n, 2n, ...).
            num_transcripts: completions per transcript (0: none).
        """
        if transcript_every_n_steps < 1:
            raise ValueError(f"ToolMetrics.transcript_every_n_steps={transcript_every_n_steps}: must be >= 1")
        if num_transcripts < 0:
            raise ValueError(f"ToolMetrics.num_transcripts={num_transcripts}: must be >= 0")
        self.transcript_every_n_steps = transcript_every_n_steps
        self.num_transcripts = num_transcripts

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not isinstance(outputs, dict) or not isinstance(outputs.get("rollout"), Rollout):
            return
        ro, rewards = outputs["rollout"], outputs.get("rewards")
        G = len(ro.texts) // len(batch)
        sums = step_sums(ro, [batch[n // G].kind for n in range(len(ro.texts))], outputs["correct"], rewards)
        # global sums: the same fixed-length vector on every rank, added up (identity on one device)
        flat = torch.tensor([sums[g][q] for g in GROUPS for q in QUANTITIES], dtype=torch.float64,
                            device=pl_module.device)                                      # (groups*quantities,)
        flat = trainer.strategy.reduce(flat, reduce_op="sum").tolist()
        sums = {g: {q: flat[i * len(QUANTITIES) + j] for j, q in enumerate(QUANTITIES)} for i, g in enumerate(GROUPS)}
        # straight to the loggers, not through `log_dict`: Lightning re-sends an on_step metric at every
        # later step until the epoch ends, so a kind absent from this batch would repeat its last value
        metrics = tool_metrics(sums, with_reward=rewards is not None)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=logger_step(trainer))
        self._log_transcripts(trainer, outputs, batch, G)

    def _log_transcripts(self, trainer: L.Trainer, outputs: dict, batch, G: int) -> None:
        if not self.num_transcripts or not trainer.is_global_zero:
            return
        step = logger_step(trainer)
        if step % self.transcript_every_n_steps:
            return
        tb = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tb is None:
            return
        indices = transcript_indices(len(batch), G, self.num_transcripts)
        text = transcript_markdown(outputs["rollout"], batch, G, indices, outputs.get("rewards"),
                                   outputs.get("components"))
        tb.experiment.add_text("transcripts/train", text, step)
