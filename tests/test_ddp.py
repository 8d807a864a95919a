"""Two processes: `python -m grpo fit` under Lightning DDP on CPU (gloo), 2 ranks, the tiny model.

One straight run of 4 steps (checkpoints at steps 2 and 4, an evaluation at step 4) and one run
resumed from its step-2 checkpoint. A `tests.run_helpers.Probe` callback records on every rank
what each step saw, the evaluation rows and the checkpoint writes. Checked: every group of G
samples stays on one rank and the ranks' questions are disjoint whole batches of the shared order;
logged metrics are means over ranks; the token-level loss is rescaled by the global token count;
evaluation covers the whole validation set once; only rank 0 writes checkpoints; a resumed run
continues with the same batches, and every rank samples its own random stream, restored from
the checkpoint on resume (the resumed run matches the straight one); a run whose ranks take their
loss passes in different numbers of micro-batches matches the straight one too.
"""
from __future__ import annotations

import json

import pytest
import torch

from data.datamodule import QADataModule
from data.loader import ResumableBatches
from tests.run_helpers import run_grpo, tiny_config

pytestmark = pytest.mark.slow
B, G, WORLD, STEPS = 2, 4, 2, 4  # configs/tiny.yaml: batch_size 2, group_size 4
VAL = 3  # odd, so that Lightning's DistributedSampler pads rank 1 with a repeated question


def _fit(root, ckpt_path=None, model_class: str | None = None) -> dict:
    probe = {"class_path": "tests.run_helpers.Probe", "init_args": {"out_dir": str(root / "probe")}}
    cfg = tiny_config(root / "cfg.yaml", root, STEPS, root / "ckpt", every_n_train_steps=2, save_top_k=-1,
                      callbacks=(probe,), devices=WORLD, strategy="ddp", accelerator="cpu")
    if model_class:
        cfg.write_text(cfg.read_text().replace("class_path: grpo.module.GRPOModule", f"class_path: {model_class}"))
    args = ["fit", "-c", cfg, "--data.val_limit", VAL] + (["--ckpt_path", ckpt_path] if ckpt_path else [])
    run_grpo(args, root / "fit.log")
    ranks = [json.loads((root / "probe" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "ckpt": root / "ckpt", "ranks": ranks}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("ddp_straight"))


@pytest.fixture(scope="module")
def resumed(straight, tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("ddp_resumed"), ckpt_path=straight["ckpt"] / "epoch=0-step=2.ckpt")


@pytest.fixture(scope="module")
def data():
    dm = QADataModule(task="offline", batch_size=B, val_limit=VAL)
    dm.setup()
    return dm


def _steps(run, rank):
    return {s["step"]: s for s in run["ranks"][rank]["steps"]}


def _state(path) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


def test_groups_stay_on_one_rank_and_ranks_get_disjoint_whole_batches(straight, data):
    assert [r["world_size"] for r in straight["ranks"]] == [WORLD, WORLD]
    expected = [[[ex.id for ex in batch] for batch in ResumableBatches(data.train_set, B, rank=r, world_size=WORLD)]
                for r in range(WORLD)]                   # rank r's batches: every other batch of one shared order
    for rank in range(WORLD):
        steps = straight["ranks"][rank]["steps"]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        for i, s in enumerate(steps):
            assert s["questions"] == expected[rank][i], f"rank {rank} step {s['step']}"
            assert s["group_ids"] == [b for b in range(B) for _ in range(G)] and len(s["texts"]) == B * G
    for step in range(1, STEPS + 1):
        assert not set(_steps(straight, 0)[step]["questions"]) & set(_steps(straight, 1)[step]["questions"])


def test_logged_metrics_are_means_over_ranks(straight):
    differ = 0
    for step in range(1, STEPS + 1):
        r0, r1 = _steps(straight, 0)[step], _steps(straight, 1)[step]
        mean = (r0["local_reward"] + r1["local_reward"]) / 2
        assert r0["logged_reward"] == pytest.approx(mean, abs=1e-6) == r1["logged_reward"]
        differ += r0["local_reward"] != r1["local_reward"]
    assert differ, "the ranks' rewards never differed: the check above would not see a missing sync"


def test_token_level_loss_is_rescaled_by_the_global_token_count(straight):
    """scale_r = T_r·W / Σ T (see grpo.module.ddp_token_scale): the scales of one step sum to W."""
    unequal = 0
    for step in range(1, STEPS + 1):
        r0, r1 = _steps(straight, 0)[step], _steps(straight, 1)[step]
        total = r0["local_tokens"] + r1["local_tokens"]
        for r in (r0, r1):
            assert r["token_scale"] == pytest.approx(r["local_tokens"] * WORLD / total, rel=1e-6)
        assert r0["token_scale"] + r1["token_scale"] == pytest.approx(WORLD)
        unequal += r0["local_tokens"] != r1["local_tokens"]
    assert unequal, "equal token counts on both ranks: the rescaling was never exercised"


def test_evaluation_covers_the_whole_validation_set_once(straight, data):
    val_ids = [ex.id for ex in data.val_set]
    assert len(val_ids) == VAL
    (e0,), (e1,) = straight["ranks"][0]["evals"], straight["ranks"][1]["evals"]
    for e in (e0, e1):
        assert e["step"] == STEPS and sorted(e["ids"]) == sorted(val_ids), "each question exactly once"
        assert e["logged"] == pytest.approx({k: v for k, v in e["metrics"].items()})
    assert e0["metrics"] == e1["metrics"]


def test_only_rank_zero_writes_checkpoints(straight):
    assert straight["ranks"][1]["saves"] == []
    assert straight["ranks"][0]["saves"] == ["epoch=0-step=2.ckpt", "last.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    names = sorted(p.name for p in straight["ckpt"].iterdir())
    assert names == ["epoch=0-step=2.adapter", "epoch=0-step=2.ckpt", "epoch=0-step=4.adapter",
                     "epoch=0-step=4.ckpt", "last.adapter", "last.ckpt"]


def test_resumed_run_continues_with_the_same_batches(straight, resumed):
    """Resumed from step 2: steps 3 and 4 get the batches of the straight run on each rank, and rank 0
    (whose sampler state the checkpoint holds) samples exactly what it sampled in the straight run."""
    for rank in range(WORLD):
        got, want = _steps(resumed, rank), _steps(straight, rank)
        assert sorted(got) == [3, 4]
        assert [got[s]["questions"] for s in (3, 4)] == [want[s]["questions"] for s in (3, 4)]
    assert _steps(resumed, 0)[3]["texts"] == _steps(straight, 0)[3]["texts"]
    assert resumed["ranks"][1]["saves"] == [] and resumed["ranks"][0]["saves"][-1] == "last.ckpt"
    assert torch.load(resumed["ckpt"] / "last.ckpt", weights_only=False)["global_step"] == STEPS


def test_ranks_sample_with_different_random_streams(straight):
    """At the start of training, the rollout samplers of the two ranks are in different states."""
    assert straight["ranks"][0]["sampler_digest"] != straight["ranks"][1]["sampler_digest"]


def test_resumed_run_matches_the_straight_run(straight, resumed):
    assert _steps(resumed, 1)[3]["texts"] == _steps(straight, 1)[3]["texts"]
    got, want = _state(resumed["ckpt"] / "last.ckpt"), _state(straight["ckpt"] / "epoch=0-step=4.ckpt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_micro_batched_run_matches_the_straight_run(straight, tmp_path_factory):
    """Rank 1 takes its loss passes one group per micro-batch (two backward passes per update), rank 0 in
    one: the run neither hangs (each rank all-reduces its gradients once per update, at its last
    micro-batch) nor drifts. Every step's gradient (each parameter's norm) is the same on both ranks
    (averaged over them) and the straight run's (fp32 rounding); the rollouts are the same. The
    weights are not compared tightly: AdamW divides by √v, which turns rounding-level gradient
    differences into weight differences of a few % of lr (measured: 1.9e-5 at lr 1e-3)."""
    run = _fit(tmp_path_factory.mktemp("ddp_micro"), model_class="tests.run_helpers.RankMicroBatches")
    for step in range(1, STEPS + 1):
        for rank in range(WORLD):
            got, want = _steps(run, rank)[step], _steps(straight, rank)[step]
            assert got["texts"] == want["texts"], (step, rank)
            assert len(got["grad"]) == 28 and any(got["grad"]), (step, rank)  # LoRA A, B of 14 Linears
            torch.testing.assert_close(torch.tensor(got["grad"]), torch.tensor(want["grad"]), atol=1e-7, rtol=1e-4)
        assert _steps(run, 0)[step]["grad"] == _steps(run, 1)[step]["grad"], f"step {step}: not averaged over ranks"
    assert any(_steps(straight, 0)[s]["token_scale"] != 1 for s in range(1, STEPS + 1))
