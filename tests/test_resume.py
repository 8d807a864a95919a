"""Resuming from a checkpoint continues exactly: 4 steps straight == 2 steps, stop, resume, 2 steps."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from data.datamodule import QADataModule
from data.loader import ReplayBatches, ResumableBatches
from grpo.module import GRPOModule


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True  # as if the run were killed right after this checkpoint


class _Batches(L.Callback):
    def __init__(self):
        self.ids = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.ids.append([ex.id for ex in batch])


def _fit(ckpt_dir, ckpt_path=None, stop_at=None, batches=None, **data_kwargs):
    L.seed_everything(0)
    module = GRPOModule(model_name="tiny", group_size=4, max_new_tokens=12, lr=1e-2, warmup_ratio=0.5)
    data = QADataModule(task="offline", batch_size=2, **data_kwargs)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True)]
    if batches is not None:
        callbacks.append(batches)
    if stop_at:
        callbacks.append(_StopAt(stop_at))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {k: v.detach().clone() for k, v in module.policy.named_parameters() if v.requires_grad}


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    straight = _fit(tmp_path / "a")
    _fit(tmp_path / "b", stop_at=2)
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "sampler_rng" in ckpt
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"]), "only trainable weights"
    resumed = _fit(tmp_path / "b", ckpt_path=tmp_path / "b" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    changed = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not changed, f"{len(changed)} trainable tensors differ after resume, e.g. {changed[:2]}"


def test_redraws_asked_by_the_module_reach_the_next_batch_and_survive_a_resume(tmp_path, monkeypatch):
    """With data.replay_slots, the module's step 7 queues the questions whose group split (here, as if the
    first of the two always did): step k + 1 starts with step k's first question, until its 4 redraws in a
    row are spent, and a run stopped at step 2 and resumed trains on the batches and weights of a straight one."""
    import grpo.module
    monkeypatch.setattr(grpo.module, "split_groups", lambda calls, G, correct: torch.tensor([True, False]))
    straight_batches, resumed_batches = _Batches(), _Batches()
    straight = _fit(tmp_path / "a", batches=straight_batches, replay_slots=1)
    first = straight_batches.ids[0][0]
    assert [b[0] for b in straight_batches.ids] == [first] * 4 and len({b[1] for b in straight_batches.ids}) == 4
    _fit(tmp_path / "b", stop_at=2, batches=resumed_batches, replay_slots=1)
    resumed = _fit(tmp_path / "b", ckpt_path=tmp_path / "b" / "last.ckpt", batches=resumed_batches, replay_slots=1)
    assert resumed_batches.ids == straight_batches.ids
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_loader_resumes_mid_epoch_and_shards_batches():
    items = list(range(20))
    full = ResumableBatches(items, 3, seed=1)
    run = list(full) + list(full)                      # two epochs: 6 batches each
    first = ResumableBatches(items, 3, seed=1)
    it = iter(first)
    seen = [next(it), next(it)]
    resumed = ResumableBatches(items, 3, seed=1)
    resumed.load_state_dict(first.state_dict())
    seen += list(resumed) + list(resumed)
    assert seen == run
    ranks = [list(ResumableBatches(items, 3, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(sum(ranks[0] + ranks[1], [])) == sorted(sum(run[:6], []))  # same batches, split by rank


def test_replay_loader_redraws_what_it_is_told_then_fresh_items_and_resumes_exactly():
    items = list(range(10))                       # B = 4: 2 batches an epoch; passes of 10 fresh items
    loader = ReplayBatches(items, 4, seed=1, slots=2, max_redraws=2)
    fresh = ResumableBatches(items, 5, seed=1)._order(0) + ResumableBatches(items, 5, seed=1)._order(1)
    it = iter(loader)
    b0 = next(it)
    assert b0 == fresh[:4] and loader.redrawn == 0
    loader.feedback([True, False, True, True])    # three asked, two slots: the third waits
    b1 = next(it)
    assert b1 == [b0[0], b0[2]] + fresh[4:6] and loader.redrawn == 2
    loader.feedback([True, False, False, False])  # b0[0] a second time in a row
    state = loader.state_dict()
    b2 = next(it, None)                           # the epoch ended after 2 batches
    assert b2 is None and loader.epoch == 1
    e1 = iter(loader)                             # epoch 1: the waiting one, b0[0] (2nd redraw), fresh
    b2 = next(e1)
    assert b2 == [b0[3], b0[0]] + fresh[6:8]
    loader.feedback([False, True, False, False])  # b0[0] has had its 2 redraws in a row: not queued again
    assert loader.queue == [] and next(e1) == fresh[8:10] + fresh[10:12]  # fresh draws run on into pass 1
    resumed = ReplayBatches(items, 4, seed=1, slots=2, max_redraws=2)
    resumed.load_state_dict(state)                # saved after b1's feedback, as a checkpoint would be
    assert list(resumed) == [] and next(iter(resumed)) == b2


@pytest.mark.parametrize("bad, match", [(dict(slots=0), "replay_slots=0"), (dict(slots=5), "replay_slots=5"),
                                        (dict(max_redraws=0), "replay_max_redraws=0"),
                                        (dict(world_size=2), "2 processes")])
def test_replay_loader_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        ReplayBatches(list(range(10)), 4, **(dict(slots=1) | bad))
