"""Callbacks: tool metrics over ranks, transcripts and the evaluation report, by hand; then through a
tiny `fit`. The metric formulas themselves are tests/test_metrics.py's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from callbacks.metrics import ToolMetrics, transcript_indices, transcript_markdown
from callbacks.report import EvalReport, always_search_baseline, pareto_frontier, point_from_eval, report_markdown
from data.types import LOOKUP, MEMORY, QAExample
from grpo.cli import main
from grpo.metrics import step_sums, tool_metrics
from grpo.rollout import Rollout
from tests import fakes

# ---------------------------------------------------------------------------------------------
# ToolMetrics: 2 questions (memory, lookup), G = 2, known texts and counts

BATCH = [QAExample("m", "Capital of France?", ("Paris",), MEMORY), QAExample("l", "Population of X?", ("42",), LOOKUP)]
TEXTS = ["<answer>Paris</answer>",                                                          # right, no call
         "<call>France capital</call><obs>Paris is the capital</obs><answer>the Paris</answer>",  # right, 1 call
         "<call>X</call><obs>41 people</obs><call>X census</call><obs>?</obs><answer>41</answer>",  # wrong, 2
         "<call>X popul"]                                                                    # unclosed call
CALLS, INCOMPLETE, TOKENS = [0, 1, 2, 0], [0, 0, 0, 1], [5, 10, 20, 8]
CORRECT = torch.tensor([True, True, False, False])  # as compute_rewards judges TEXTS (EM ignores "the")
REWARDS = torch.tensor([1.2, 1.15, -0.5, -1.2])
KINDS = [MEMORY, MEMORY, LOOKUP, LOOKUP]           # sample n answers BATCH[n // 2]


def fake_rollout(texts=TEXTS, calls=CALLS, incomplete=INCOMPLETE, tokens=TOKENS) -> Rollout:
    return fakes.fake_rollout(texts, calls, no_obs=incomplete, incomplete=incomplete, tokens=tokens, G=2)


def test_callback_logs_ratios_of_global_sums():
    """Two simulated ranks (memory on one, lookup on the other): ratios are those of the whole batch,
    not means of per-rank ratios (productivity 2/3, where the mean of 2.0 and 0.0 would be 1.0)."""
    full = fake_rollout()
    rank0 = fake_rollout(TEXTS[:2], CALLS[:2], INCOMPLETE[:2], TOKENS[:2])
    rank1 = step_sums(fake_rollout(TEXTS[2:], CALLS[2:], INCOMPLETE[2:], TOKENS[2:]), KINDS[2:], CORRECT[2:],
                      REWARDS[2:])
    other = torch.tensor([rank1[g][q] for g in ("all", MEMORY, LOOKUP) for q in rank1["all"]], dtype=torch.float64)
    logged = {}
    logger = SimpleNamespace(log_metrics=lambda d, step: logged.update(d))
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda x, reduce_op: x + other), global_step=1,
                              is_global_zero=True, loggers=[logger],
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=1)))
    module = SimpleNamespace(device=torch.device("cpu"))
    outputs = {"rollout": rank0, "rewards": REWARDS[:2], "correct": CORRECT[:2]}
    ToolMetrics().on_train_batch_end(trainer, module, outputs, BATCH[:1], 0)
    assert logged == pytest.approx(tool_metrics(step_sums(full, KINDS, CORRECT, REWARDS)))
    assert logged["tools/productivity"] == pytest.approx(2 / 3)


def test_transcripts_show_tags_verbatim():
    assert transcript_indices(2, 3, 3) == [0, 3, 1]  # first sample of each question first
    ro = fake_rollout(texts=[*TEXTS[:3], "```<call>x</call>````"])
    md = transcript_markdown(ro, BATCH, 2, [1, 3], REWARDS, {"correct": torch.tensor([1.0, 1.0, -0.5, -0.5])})
    assert "question: Capital of France?" in md and "gold:     42" in md
    assert "<call>France capital</call><obs>Paris is the capital</obs>" in md
    assert "reward **+1.150** (correct +1.000)" in md and "sampled tokens 8" in md
    assert "`````text\n```<call>x</call>````\n`````" in md  # the fence outgrows the text's backticks


# ---------------------------------------------------------------------------------------------
# EvalReport


def test_pareto_frontier_by_hand():
    assert pareto_frontier([]) == []
    assert pareto_frontier([(10.0, 0.5)]) == [True]
    # (20, .5) is dominated by (10, .5): same accuracy, fewer tokens; (30, .4) by everything better and cheaper
    assert pareto_frontier([(10, .5), (20, .5), (30, .8), (30, .4), (5, .1)]) == [True, False, True, False, True]
    assert pareto_frontier([(10, .5), (10, .5)]) == [True, True]  # equal points do not dominate each other
    assert pareto_frontier([(10, .5), (10, .6)]) == [False, True]  # same tokens, more accurate


def test_baseline_and_report_rows():
    metrics = {"eval/em": 0.5, "eval/f1": 0.6, "eval/tokens_per_sample": 40.0, "eval/calls_per_sample": 1.0,
               "eval/search_rate": 1.0, "eval/memory/search_rate": 1.0, "eval/lookup/search_rate": 1.0}
    points = [point_from_eval(10, metrics),
              point_from_eval(20, metrics | {"eval/tokens_per_sample": 30.0, "eval/search_rate": 0.5,
                                             "eval/memory/search_rate": 0.0})]
    assert always_search_baseline(points) == 40.0
    assert always_search_baseline(points[1:]) is None
    assert always_search_baseline(points[1:], baseline_tokens=60.0) == 60.0
    md = report_markdown(points, 40.0, pareto_frontier([(p["tokens"], p["em"]) for p in points]))
    assert "| step 10 | 0.500 | 0.600 | 40.0 | 1.00 | 1.00 (1.00 / 1.00) | 0.0% | no |" in md
    assert "| step 20 | 0.500 | 0.600 | 30.0 | 1.00 | 0.50 (0.00 / 1.00) | 25.0% | yes |" in md
    assert "| step 20 | 0.500 | 0.600 | 30.0 | 1.00 | 0.50 (0.00 / 1.00) | n/a | yes |" in report_markdown(
        points[1:], None, [True])


def test_report_history_survives_state_dict():
    a = EvalReport()
    a.points = [point_from_eval(3, {"eval/em": 1.0, "eval/tokens_per_sample": 7.0})]
    b = EvalReport()
    b.load_state_dict(a.state_dict())
    assert b.points == a.points and b.points is not a.points
    with pytest.raises(ValueError, match="EvalReport.baseline_tokens=0"):
        EvalReport(baseline_tokens=0)


# ---------------------------------------------------------------------------------------------
# Both callbacks in a tiny fit (configs/tiny.yaml lists them)


def test_tiny_fit_logs_tool_metrics_transcripts_and_report(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    main(["fit", "-c", "configs/tiny.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    scalars, tensors, acc_of = set(), {}, {}
    for e in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(e), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        tensors |= {t: acc.Tensors(t) for t in acc.Tags()["tensors"]}
        acc_of |= {t: acc for kind in ("scalars", "images") for t in acc.Tags()[kind]}
    assert "eval/pareto" in acc_of, "no Pareto image logged"
    assert {"tools/search_rate", "tools/incomplete_per_sample"} <= scalars, sorted(scalars)
    assert {f"rollout/{k}/tokens_per_sample" for k in (MEMORY, LOOKUP)} & scalars, sorted(scalars)
    assert {f"reward/{k}/mean" for k in (MEMORY, LOOKUP)} & scalars, sorted(scalars)
    (transcript,) = tensors["transcripts/train/text_summary"]  # every 2 batches: at step 0 only
    text = transcript.tensor_proto.string_val[0].decode()
    assert "question:" in text and "gold:" in text and "reward **" in text and text.count("**sample ") == 2
    # text and image sit at the x-axis value of the scalars of the same batch / evaluation
    assert transcript.step == acc_of["tools/search_rate"].Scalars("tools/search_rate")[0].step
    assert [e.step for e in acc_of["eval/pareto"].Images("eval/pareto")] == [
        e.step for e in acc_of["eval/em"].Scalars("eval/em")]

    (report_dir,) = {p.parent for p in tmp_path.rglob("report.md")}
    assert (report_dir / "pareto.png").read_bytes().startswith(b"\x89PNG")
    rows = [line for line in (report_dir / "report.md").read_text().splitlines() if line.startswith("| step ")]
    assert [r.split()[2] for r in rows] == ["1", "2"]  # one row per evaluation (val_check_interval 1)
    assert all(r.rstrip().endswith(("| yes |", "| no |")) for r in rows)
    ckpt = next(tmp_path.rglob("*step=2.ckpt"))
    assert f"`{ckpt}`" in rows[1], "the step-2 row names the checkpoint saved at step 2"
    state = torch.load(ckpt, weights_only=False)["callbacks"]["EvalReport"]  # what a resumed run starts from
    assert [p["step"] for p in state["points"]] == [1, 2]
    assert not list(report_dir.glob(".*")), "temporary files left behind"


def test_validate_run_adds_no_report_row(tmp_path):
    """`validate` after `fit`: the report keeps the rows of the training run (no misleading step-0 row)."""
    args = ["-c", "configs/tiny.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *args])
    (report,) = tmp_path.rglob("report.md")
    before = report.read_text()
    ckpt = next(tmp_path.rglob("last.ckpt"))
    main(["validate", *args, "--ckpt_path", str(ckpt)])
    rows = [line for line in report.read_text().splitlines() if line.startswith("| step ")]
    assert len(list(tmp_path.rglob("report.md"))) == 1, "validate wrote a report of its own"
    assert report.read_text() == before and [r.split()[2] for r in rows] == ["2"]


def test_a_kind_absent_from_a_batch_logs_no_point(tmp_path):
    """Per-kind metrics get a TensorBoard point only at the steps whose batch holds that kind: Lightning's
    log_dict would repeat the memory kind's step-0 value at steps 1-3 (a silently skewed curve)."""
    import glob

    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    from callbacks.metrics import ToolMetrics
    from data.types import QAExample
    from grpo.module import GRPOModule

    L.seed_everything(0)
    m = GRPOModule(model_name="tiny", group_size=2, max_new_tokens=4)
    m.env = lambda q: "x"
    qs = [QAExample(id="m", question="Q?", answers=("a",), kind="memory")] + \
         [QAExample(id=str(i), question="Q?", answers=("a",), kind="lookup") for i in range(3)]
    trainer = L.Trainer(max_steps=4, logger=TensorBoardLogger(str(tmp_path)), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ToolMetrics(num_transcripts=0)])
    trainer.fit(m, DataLoader(qs, batch_size=1, collate_fn=list, shuffle=False))
    acc = EventAccumulator(glob.glob(trainer.logger.log_dir + "/events*")[0])
    acc.Reload()
    assert [x.step for x in acc.Scalars("tools/memory/search_rate")] == [0]
    assert [x.step for x in acc.Scalars("tools/lookup/search_rate")] == [1, 2, 3]
    assert [x.step for x in acc.Scalars("tools/search_rate")] == [0, 1, 2, 3]
