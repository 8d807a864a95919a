"""`EvalReport`: accuracy against token cost of every evaluated checkpoint, as a plot and a table.

The callback collects the rows `validation_step` returns (one per question, `grpo.evaluation.eval_rows`)
in `on_validation_batch_end`; after each validation epoch (not the sanity check) it computes their
metrics (`grpo.evaluation.eval_metrics`, the very function the module logs with) and keeps one point
per evaluated step:

    step, em (eval/em), f1 (eval/f1), tokens (eval/tokens_per_sample), calls (eval/calls_per_sample),
    search_rate (eval/search_rate), search_memory / search_lookup (eval/<kind>/search_rate)

The points live in the callback's `state_dict`, so a resumed run keeps its history. Rank 0 then
writes to `output_dir` (default `<trainer.log_dir>/report`), each file atomically:

    pareto.png  accuracy (EM) vs sampled tokens per question, each point labelled with its step,
                the Pareto frontier as a line, the always-search baseline as a dashed line;
                also logged to TensorBoard as the image `eval/pareto`
    report.md   one row per evaluated checkpoint (the columns are explained in the file)

Pareto frontier (max accuracy, min tokens): a point is on it unless another point has accuracy
>= and tokens <= with at least one strict. The always-search baseline is the token cost of a
policy that searches on every question: `baseline_tokens` when given (measure it with an
always-search run), else the cheapest evaluated point whose search rate is >= 0.99, else unknown.
Token reduction = 1 - tokens / baseline_tokens.

A `validate` or `test` run (any checkpoint, any question file: `data.val_path`) writes instead

    eval.json   the metrics (overall and per kind) and one row per question (answer text, EM, calls...)
    eval.md     the metrics as a table, one row for all questions and one per kind

Under DDP the rows of every rank are gathered first (`grpo.evaluation.gather_eval_rows`, each question
once), so the figures cover the whole validation set.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.metrics import logger_step
from data.files import atomic_write
from grpo.evaluation import eval_metrics, gather_eval_rows

ALWAYS_SEARCH_RATE = 0.99  # a point searching on at least this share of questions stands for "always search"
_STEP_IN_NAME = re.compile(r"step=(\d+)")


# ---------------------------------------------------------------------------------------------
# Pure functions


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (tokens, accuracy) points: True where no other point has acc' >= acc and tokens' <= tokens
    with one of them strict. Equal points do not dominate each other (both stay on the frontier)."""
    return [not any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for t2, a2 in points) for t, a in points]


def point_from_eval(step: int, metrics: dict[str, float]) -> dict:
    """One report point from `eval_metrics` output (kinds missing from the eval set give None)."""
    return {"step": int(step), "em": metrics["eval/em"], "f1": metrics.get("eval/f1"),
            "tokens": metrics["eval/tokens_per_sample"], "calls": metrics.get("eval/calls_per_sample"),
            "search_rate": metrics.get("eval/search_rate"),
            "search_memory": metrics.get("eval/memory/search_rate"),
            "search_lookup": metrics.get("eval/lookup/search_rate"), "ckpt": None}


def always_search_baseline(points: Sequence[dict], baseline_tokens: float | None = None) -> float | None:
    """`baseline_tokens` if given, else the fewest tokens among points with search rate >= 0.99, else None."""
    if baseline_tokens is not None:
        return float(baseline_tokens)
    costs = [p["tokens"] for p in points if (p.get("search_rate") or 0.0) >= ALWAYS_SEARCH_RATE]
    return min(costs, default=None)


EVAL_COLUMNS = (("em", "EM"), ("f1", "F1"), ("well_formed", "well-formed"), ("calls_per_sample", "calls / q"),
                ("search_rate", "search rate"), ("tokens_per_sample", "tokens / q"),
                ("productivity", "productivity"), ("cost_of_pass", "cost of pass"),
                ("wrong_direct_rate", "wrong direct"), ("misread_rate", "misread"))


def eval_markdown(metrics: dict[str, float], num_questions: dict[str, int]) -> str:
    """`eval_metrics` output as a table: one row for all questions, one per kind present."""
    head = "| questions | n | " + " | ".join(title for _, title in EVAL_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(EVAL_COLUMNS) + 2)]
    for group, n in num_questions.items():
        prefix = "eval/" if group == "all" else f"eval/{group}/"
        lines.append(f"| {group} | {n} | " + " | ".join(fmt_num(metrics.get(prefix + key)) for key, _ in EVAL_COLUMNS)
                     + " |")
    return "\n".join(lines) + ("\n\nproductivity = correct answers / executed calls; cost of pass = sampled "
                                "tokens / correct answers; n/a where the denominator is 0. wrong direct: "
                                "wrong without a search; misread: wrong though an observation held a gold "
                                "answer (shares of all questions).\n")


def fmt_num(x: float | None, fmt: str = ".3f") -> str:
    """A number as a table cell; "n/a" for None."""
    return "n/a" if x is None else format(x, fmt)


COLUMNS = """Columns:
- **checkpoint**: the training step evaluated, and the checkpoint file saved at that step if it still exists.
- **EM**: exact match (HotpotQA normalisation) of the answer, mean over the evaluated questions.
- **F1**: token F1 of the answer, mean over the questions.
- **avg tokens**: tokens sampled by the policy per question (tool observations not counted).
- **avg calls**: executed tool calls per question.
- **search rate**: share of questions with at least one call, overall (memory / lookup questions).
- **token reduction**: 1 - avg tokens / always-search baseline tokens{baseline_note}.
- **frontier**: on the Pareto frontier of (max EM, min avg tokens) among the rows."""


def report_markdown(points: Sequence[dict], baseline: float | None, frontier: Sequence[bool]) -> str:
    """The report: column explanations, then one table row per point."""
    note = f" (baseline: {baseline:.1f} tokens)" if baseline is not None else " (baseline unknown: n/a)"
    lines = ["# Evaluation report: accuracy vs token cost", "", COLUMNS.format(baseline_note=note), "",
             "| checkpoint | EM | F1 | avg tokens | avg calls | search rate (memory / lookup) "
             "| token reduction | frontier |", "|---|---|---|---|---|---|---|---|"]
    for p, on in zip(points, frontier):
        ckpt = f"step {p['step']}" + (f" `{p['ckpt']}`" if p.get("ckpt") and os.path.exists(p["ckpt"]) else "")
        memory, lookup = fmt_num(p["search_memory"], ".2f"), fmt_num(p["search_lookup"], ".2f")
        search = f"{fmt_num(p['search_rate'], '.2f')} ({memory} / {lookup})"
        reduction = f"{1 - p['tokens'] / baseline:.1%}" if baseline else "n/a"
        lines.append(f"| {ckpt} | {fmt_num(p['em'])} | {fmt_num(p['f1'])} | {fmt_num(p['tokens'], '.1f')} "
                     f"| {fmt_num(p['calls'], '.2f')} | {search} | {reduction} | {'yes' if on else 'no'} |")
    return "\n".join(lines) + "\n"


def pareto_figure(points: Sequence[dict], frontier: Sequence[bool], baseline: float | None) -> Figure:
    """Accuracy vs tokens per question, points labelled by step, frontier line, baseline line (Agg canvas)."""
    return pareto_plot([p["tokens"] for p in points], [p["em"] for p in points], [str(p["step"]) for p in points],
                       frontier, "sampled tokens per question", "accuracy vs token cost (labels: training step)",
                       baseline, f"always-search baseline ({baseline:.1f} tokens)" if baseline is not None else "")


def pareto_plot(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], frontier: Sequence[bool],
                xlabel: str, title: str, vline: float | None = None, vline_label: str = "") -> Figure:
    """Accuracy (y) against a cost (x): labelled points, the frontier as a line, an optional dashed
    vertical line (a baseline's cost). On an Agg canvas: no display needed."""
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="evaluated")
    for label, x, y in zip(labels, xs, ys):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((x, y) for x, y, on in zip(xs, ys, frontier) if on)
    ax.plot([x for x, _ in front], [y for _, y in front], color="tab:orange", marker="o", label="Pareto frontier")
    if vline is not None:
        ax.axvline(vline, color="gray", linestyle="--", label=vline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# The callback


class EvalReport(L.Callback):
    """Writes `pareto.png` and `report.md` after each evaluation (see the module docstring)."""

    def __init__(self, output_dir: str | None = None, baseline_tokens: float | None = None):
        """
        Args:
            output_dir: folder of the report (None: `<trainer.log_dir>/report`).
            baseline_tokens: tokens per question of an always-search policy (None: the cheapest
                evaluated point with search rate >= 0.99, if any).
        """
        if baseline_tokens is not None and baseline_tokens <= 0:
            raise ValueError(f"EvalReport.baseline_tokens={baseline_tokens}: must be > 0")
        self.output_dir = output_dir
        self.baseline_tokens = baseline_tokens
        self.points: list[dict] = []
        self._rows: list[dict] = []  # this rank's rows of the current evaluation

    def state_dict(self) -> dict:
        return {"points": [dict(p) for p in self.points]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = [dict(p) for p in state_dict.get("points", [])]

    def report_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "report")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._rows += outputs or []  # the rows `validation_step` returned

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        rows, self._rows = gather_eval_rows(self._rows), []  # every rank: the whole validation set
        if not rows:
            return
        metrics = eval_metrics(rows)
        # only evaluations during `fit` add points: a `validate` run's global_step is 0 whatever
        # checkpoint it loaded (its metrics are printed and logged, and the checkpoint's own row
        # was written when it was evaluated during training)
        if trainer.state.fn in ("validate", "test"):
            self.write_eval(trainer, pl_module, metrics, rows)
        elif trainer.state.fn == "fit":
            point = point_from_eval(trainer.global_step, metrics)
            self.points = [p for p in self.points if p["step"] != point["step"]] + [point]  # one point per step
            self.write(trainer, pl_module, log_figure=True)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_end = on_validation_end

    def write_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float],
                   rows: list[dict]) -> None:
        """eval.json and eval.md of a validate/test run (see the module docstring)."""
        out = self.report_dir(trainer)
        if not trainer.is_global_zero:
            return
        counts = {"all": len(rows)} | {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})}
        record = {"metrics": metrics, "num_questions": counts, "rows": rows}
        atomic_write(out / "eval.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, ensure_ascii=False)))
        atomic_write(out / "eval.md", lambda tmp: Path(tmp).write_text(eval_markdown(metrics, counts)))
        pl_module.print(f"[eval] {out / 'eval.md'}  {out / 'eval.json'}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.points:
            self.write(trainer, pl_module)  # again: checkpoints saved after the last evaluation get their path

    def _attach_checkpoints(self, trainer: L.Trainer) -> None:
        """Give each point the file a ModelCheckpoint saved at its step (read from `step=N` in the name)."""
        by_step = {p["step"]: p for p in self.points}
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            for path in [*cb.best_k_models, cb.best_model_path, cb.last_model_path]:
                m = _STEP_IN_NAME.search(Path(path).name) if path else None
                if m and int(m.group(1)) in by_step:
                    by_step[int(m.group(1))]["ckpt"] = str(path)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, log_figure: bool = False) -> None:
        self._attach_checkpoints(trainer)
        out = self.report_dir(trainer)  # on every rank: `trainer.log_dir` is a broadcast
        if not trainer.is_global_zero:
            return
        frontier = pareto_frontier([(p["tokens"], p["em"]) for p in self.points])
        baseline = always_search_baseline(self.points, self.baseline_tokens)
        text = report_markdown(self.points, baseline, frontier)
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
        fig = pareto_figure(self.points, frontier, baseline)
        atomic_write(out / "pareto.png", lambda tmp: fig.savefig(tmp, format="png"))
        for logger in trainer.loggers if log_figure else []:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("eval/pareto", fig, logger_step(trainer), close=False)
        pl_module.print(f"[report] {out / 'report.md'}  {out / 'pareto.png'}")
