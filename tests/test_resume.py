"""Resuming from a checkpoint continues exactly: 4 steps straight == 2 steps, stop, resume, 2 steps."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from data.datamodule import QADataModule
from data.loader import ResumableBatches
from grpo.module import GRPOModule


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True  # as if the run were killed right after this checkpoint


def _fit(ckpt_dir, ckpt_path=None, stop_at=None):
    L.seed_everything(0)
    module = GRPOModule(model_name="tiny", group_size=4, max_new_tokens=12, lr=1e-2, warmup_ratio=0.5)
    data = QADataModule(task="offline", batch_size=2)
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True)]
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
