"""Evaluation of the agent on held-out questions: one greedy (or `eval_temperature`) rollout per
question, one row per question, the eval/… metrics of the rows, gathered over DDP ranks.

Not part of what `GRPOModule.training_step` needs: `EvaluationHooks` gives `grpo.agent.AgentModule`
its `validation_step`/`test_step` and epoch-end logging; `callbacks.report.EvalReport` collects the
same rows and writes them (eval.json, eval.md, the Pareto plot).

Metrics, over the n questions (each formula as in `grpo.metrics`, whose sums and ratios they use):

    eval/em, eval/f1           Σ EM / n, Σ F1 / n of the answer (HotpotQA normalisation; no answer: 0)
    eval/well_formed           #{well-formed and ending in an answer} / n
    eval/calls_per_sample      Σ calls / n
    eval/search_rate           #{calls >= 1} / n
    eval/tokens_per_sample     Σ sampled tokens / n
    eval/productivity          Σ EM / Σ calls   (not logged without calls)
    eval/cost_of_pass          Σ sampled tokens / Σ EM   (not logged when nothing is correct)
    eval/wrong_direct_rate     #{wrong, no call} / n   (System 1 errors: answered from memory, wrongly)
    eval/misread_rate          #{wrong, a gold answer inside one of its observations} / n   (the search
                               found it, the answer missed it)

and the same per question kind as eval/<kind>/<metric>. Under DDP the rows of every rank are
gathered first, each question once (`gather_eval_rows`): ratios of global sums.

1 − EM splits into wrong_direct + misread + the rest (searched, and no observation held the gold: a
bad query or a fact the tool lacks); on a set the tool covers, the first two say whether an EM gap
comes from knowing or from reading. Where the gold is a name the observations carry anyway (a
comparison's country), misread counts every wrong answer whose searches reached that name.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import torch

from data.answers import contains_gold, exact_match, f1_score
from data.types import QAExample
from envs.protocol import observations, parse_completion
from grpo.metrics import rates, sums_by_kind
from grpo.rollout import Rollout

EVAL = ("em", "f1", "well_formed", "calls_per_sample", "search_rate", "tokens_per_sample", "productivity",
        "cost_of_pass", "wrong_direct_rate", "misread_rate")


def eval_rows(batch: Sequence[QAExample], ro: Rollout) -> list[dict]:
    """One row per question of an evaluation rollout (one completion per question): its kind, EM, F1,
    well-formedness (and an answer), executed calls, sampled tokens and its error class, plus id,
    question and text."""
    rows = []
    for i, ex in enumerate(batch):
        parsed = parse_completion(ro.texts[i])
        em, calls = exact_match(parsed.answer or "", ex.answers), float(ro.num_calls[i])
        rows.append({
            "kind": ex.kind, "em": em, "f1": f1_score(parsed.answer or "", ex.answers),
            "well_formed": float(parsed.well_formed and parsed.answer is not None),
            "calls": calls, "tokens": float(ro.completion_mask[i].sum()),
            **error_class(ro.texts[i], em, calls, ex.answers),
            "id": ex.id, "question": ex.question, "text": ro.texts[i]})
    return rows


def error_class(text: str, em: float, calls: float, golds: Sequence[str]) -> dict[str, float]:
    """Where a wrong answer went wrong: wrong_direct = 1 if it made no call (answered from memory),
    misread = 1 if a gold answer is inside one of its observations (`contains_gold`); both 0 when right."""
    wrong = em < 1.0
    return {"wrong_direct": float(wrong and calls == 0),
            "misread": float(wrong and contains_gold(" ".join(observations(text)), golds))}


def eval_metrics(rows: Sequence[Mapping]) -> dict[str, float]:
    """The eval/… metrics of the rows (see the table): eval/<metric>, then eval/<kind>/<metric> for
    each kind present; productivity and cost_of_pass are left out where their denominator is 0."""
    sums = sums_by_kind([r["kind"] for r in rows], {
        "correct": [r["em"] for r in rows], "f1": [r["f1"] for r in rows],
        "well_formed": [r["well_formed"] for r in rows], "calls": [r["calls"] for r in rows],
        "searched": [r["calls"] > 0 for r in rows], "tokens": [r["tokens"] for r in rows],
        "wrong_direct": [r["wrong_direct"] for r in rows], "misread": [r["misread"] for r in rows]})
    out = {}
    for group, s in sums.items():
        if s["samples"]:
            prefix = "eval/" if group == "all" else f"eval/{group}/"
            out |= {prefix + k: v for k, v in rates(s).items() if k in EVAL}
    return out


def all_ranks(obj) -> list:
    """[obj of rank 0, rank 1, ...] under torch.distributed, else [obj]."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_eval_rows(rows: list[dict]) -> list[dict]:
    """Under DDP, the evaluation rows of every rank, each question once; else `rows` unchanged.

    Lightning's DistributedSampler pads the validation set with repeated questions so that every
    rank gets as many; keeping the first row of each (id, question) counts every question once.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    seen, unique = set(), []
    for row in (row for rank_rows in all_ranks(rows) for row in rank_rows):
        if (row["id"], row["question"]) not in seen:
            seen.add((row["id"], row["question"]))
            unique.append(row)
    return unique


class EvaluationHooks:
    """The validation/test hooks of `grpo.agent.AgentModule` (a LightningModule with `rollout` and
    `hparams.eval_*`): rollouts on held-out questions, their rows, the epoch's eval/… metrics."""

    _eval_rows: tuple[dict, ...] = ()  # this rank's rows of the current evaluation (immutable: never shared)

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = ()  # rows left by an interrupted evaluation must not count in this one

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def validation_step(self, batch: list[QAExample], batch_idx: int) -> list[dict]:
        """Rollouts at `eval_temperature` (0: greedy), one per question: its row of accuracy, format,
        tokens and tool use (`eval_rows`). The rows are returned, for callbacks
        (`on_validation_batch_end`: the evaluation report), and kept for the epoch's metrics."""
        hp = self.hparams
        ro = self.rollout(batch, temperature=hp.eval_temperature, group_size=1,
                          max_new_tokens=hp.eval_max_new_tokens or hp.max_new_tokens,
                          top_p=hp.eval_top_p, generator=self.eval_generator(batch_idx))
        rows = eval_rows(batch, ro)
        self._eval_rows += tuple(rows)
        return rows

    def eval_generator(self, batch_idx: int) -> torch.Generator:
        """The RNG of one evaluation batch, seeded from (seed, global step, rank, batch) — never the
        training rollouts' stream (`sampler`): how often and on what a run evaluates does not change
        what it trains on, a resumed run evaluates as the uninterrupted one did, and a checkpoint
        evaluated twice gives the same rows. (Greedy evaluation, the default, draws nothing.)"""
        key = f"{self.hparams.seed}/eval/{self.global_step}/{self.global_rank}/{batch_idx}"
        return torch.Generator(self.device).manual_seed(random.Random(key).getrandbits(63))

    def test_step(self, batch: list[QAExample], batch_idx: int) -> list[dict]:
        return self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        rows, self._eval_rows = gather_eval_rows(list(self._eval_rows)), ()  # every rank: the whole validation set
        if not rows:
            return
        metrics = eval_metrics(rows)
        self.log_dict(metrics, sync_dist=True)  # already equal on every rank: the mean over ranks keeps them
        if not self.trainer.sanity_checking:
            self.print(f"[eval step {self.global_step}] " + "  ".join(
                f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items() if "/" not in k[5:]))

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
