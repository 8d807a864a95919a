"""Callbacks that the subprocess tests put into real `python -m grpo fit` runs (not tests themselves).

    Pace(seconds)          sleep after every training step: a window for an outside SIGKILL
    KillDuringSave(nth)    SIGKILL this process halfway through writing the nth `last.ckpt`
    Probe(out_dir)         record, per rank, what each step saw and every checkpoint write, as JSON

They change nothing the training computes: a run with them gives the weights of a run without.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import lightning as L
from fsspec.implementations.local import LocalFileOpener


class Pace(L.Callback):
    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class KillDuringSave(L.Callback):
    """Writes to a file named `last.ckpt` go through fsspec's LocalFileOpener (Lightning's `_atomic_save`
    writes inside an fsspec transaction: a temporary file, renamed on commit). The nth such write puts
    half of its bytes on disk, flushes them, and the process kills itself with SIGKILL, which no
    handler can intercept: what is on disk afterwards is what a crash mid-save leaves."""

    def __init__(self, nth: int = 3):
        self.nth, self.count = nth, 0
        original = LocalFileOpener.write

        def write(opener, data):
            if Path(opener.path).name == "last.ckpt":
                self.count += 1
                if self.count == self.nth:
                    original(opener, data[:len(data) // 2])
                    opener.f.flush()
                    os.fsync(opener.f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(opener, data)

        LocalFileOpener.write = write


class Probe(L.Callback):
    """Per rank: `rank<r>.json` in `out_dir` with one record per training step (questions, group ids,
    local and logged rewards, token scale), the evaluation rows, and the checkpoint files written."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps, self.evals, self.saves = [], [], []

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        write = io.save_checkpoint

        def recorded(checkpoint, path, storage_options=None):
            self.saves.append(Path(path).name)
            return write(checkpoint, path, storage_options)

        io.save_checkpoint = recorded  # Strategy.save_checkpoint calls it on global rank 0 only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ro = outputs["rollout"]
        self.steps.append({
            "step": trainer.global_step, "questions": [ex.id for ex in batch],
            "group_ids": ro.group_ids.tolist(), "num_samples": len(ro.texts), "texts": ro.texts,
            "local_reward": float(outputs["rewards"].mean()),
            "logged_reward": float(trainer.callback_metrics["reward/mean"]),
            "local_tokens": int(ro.completion_mask.sum()), "token_scale": float(outputs["token_scale"]),
        })

    def on_validation_end(self, trainer, pl_module):  # after the module's on_validation_epoch_end
        self.evals.append({"step": trainer.global_step, "ids": [r["id"] for r in pl_module.last_eval_rows],
                           "metrics": dict(pl_module.last_eval),
                           "logged_em": float(trainer.callback_metrics["eval/em"])})

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps,
                  "evals": self.evals, "saves": self.saves}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
