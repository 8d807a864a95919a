"""What the subprocess tests need to drive real `python -m grpo fit` runs (no tests in here).

    tiny_config(...)       configs/tiny.yaml with temporary folders, more steps, a checkpoint every n steps
    run_grpo(args)         `python -m grpo <args>` in a subprocess, one thread, from the repository root
    one_thread()           context: torch on one thread in this process, as in the subprocesses
    Pace(seconds)          callback: sleep after every training step (a window for an outside SIGKILL)
    KillDuringSave(nth)    callback: SIGKILL this process halfway through writing the nth `last.ckpt`
    Probe(out_dir)         callback: record, per rank, what each step saw and every checkpoint write
    RankMicroBatches       GRPOModule taking its loss passes one group per micro-batch on rank 1 only

The callbacks change nothing the training computes; neither does RankMicroBatches (only how the
gradient is accumulated).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from grpo.evaluation import eval_metrics, gather_eval_rows
from grpo.module import GRPOModule

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny_config(path: Path, root: Path, max_steps: int, ckpt_dir: Path, every_n_train_steps: int = 1,
                save_top_k: int = 1, callbacks: tuple[dict, ...] = (), **trainer) -> Path:
    """Write configs/tiny.yaml to `path` with every output under `root`, `max_steps` steps and its
    AdapterCheckpoint (save_last) writing to `ckpt_dir` every n steps; `callbacks` are appended."""
    cfg = yaml.safe_load(TINY.read_text())
    t = cfg["trainer"]
    t.update(max_steps=max_steps, default_root_dir=str(root), enable_progress_bar=False,
             enable_model_summary=False, **trainer)
    t["logger"]["init_args"]["save_dir"] = str(root)
    (ckpt,) = [c for c in t["callbacks"] if c["class_path"] == "callbacks.export.AdapterCheckpoint"]
    ckpt["init_args"].update(dirpath=str(ckpt_dir), every_n_train_steps=every_n_train_steps, save_top_k=save_top_k)
    t["callbacks"] += list(callbacks)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_grpo(args: list, log: Path, wait: bool = True, timeout: float = 300, **env) -> subprocess.Popen:
    """`python -m grpo <args>` from the repository root on one thread (see tests/conftest.py), its
    output in `log`, in a session of its own (a DDP run's other ranks are its children).
    wait=True: wait until it ends, assert that it succeeded; past `timeout` seconds (a rank stuck
    in a collective, say) kill the whole session and fail. wait=False: return at once."""
    cmd = [sys.executable, "-m", "grpo", *map(str, args)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{' '.join(cmd)} runs after {timeout} s:\n{Path(log).read_text()[-6000:]}")
        assert code == 0, f"{' '.join(cmd)} failed:\n{Path(log).read_text()[-6000:]}"
    return proc


@contextlib.contextmanager
def one_thread():
    """torch on one thread. tests/conftest.py does this for tests not marked slow, but not for
    module-scoped fixtures (set up first) nor for slow tests; on this 2-core machine, with another
    process on a core, two threads make a tiny run ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Pace(L.Callback):
    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class KillDuringSave(L.Callback):
    """Checkpoints are written by `callbacks.export.AtomicCheckpointIO`: torch.save into a temporary
    file beside the target, then a rename. The nth save of `last.ckpt` puts half of its bytes in that
    temporary file, flushes them, and the process kills itself with SIGKILL, which no handler can
    intercept: what is on disk afterwards is what a crash mid-save leaves."""

    def __init__(self, nth: int = 3):
        self.nth, self.count = nth, 0
        original = torch.save

        def save(obj, f, *args, **kwargs):
            if ".last.ckpt.tmp" in str(getattr(f, "name", f)):
                self.count += 1
                if self.count == self.nth:
                    buf = io.BytesIO()
                    original(obj, buf, *args, **kwargs)
                    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(obj, f, *args, **kwargs)

        torch.save = save


class Probe(L.Callback):
    """Per rank: `rank<r>.json` in `out_dir` with one record per training step (questions, group ids,
    texts, local and logged mean reward, token count and scale, the norm of each parameter's gradient
    at its (last) optimizer step), the evaluation rows of each
    validation, the checkpoint files this rank wrote, and a digest of the rollout sampler's state
    when training starts.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps, self.evals, self.saves, self.sampler_digest = [], [], [], None

    def _record_saves(self, trainer):  # from on_fit_start: after every setup (AdapterCheckpoint sets the IO)
        ckpt_io = trainer.strategy.checkpoint_io
        write = ckpt_io.save_checkpoint

        def recorded(checkpoint, path, storage_options=None):
            self.saves.append(Path(path).name)
            return write(checkpoint, path, storage_options)

        ckpt_io.save_checkpoint = recorded  # Lightning's Strategy.save_checkpoint calls it on global rank 0 only

    def on_fit_start(self, trainer, pl_module):  # after the module's setup and any checkpoint restore
        self._record_saves(trainer)
        self.sampler_digest = hashlib.sha256(pl_module.sampler.get_state().numpy().tobytes()).hexdigest()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # the gradient the step uses (all-reduced)
        self._grad = [float(p.grad.norm()) for p in pl_module.parameters() if p.grad is not None]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ro = outputs["rollout"]
        self.steps.append({
            "grad": getattr(self, "_grad", []),
            "step": trainer.global_step, "questions": [ex.id for ex in batch],
            "group_ids": ro.group_ids.tolist(), "texts": ro.texts,
            "local_reward": float(outputs["rewards"].mean()),
            "logged_reward": float(trainer.callback_metrics["reward/mean"]),
            "local_tokens": int(ro.completion_mask.sum()), "token_scale": float(outputs["token_scale"]),
        })

    def on_validation_epoch_start(self, trainer, pl_module):
        self._rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._rows += outputs  # the rows `validation_step` returned

    def on_validation_end(self, trainer, pl_module):  # after the module's on_validation_epoch_end
        if trainer.sanity_checking:
            return
        rows = gather_eval_rows(self._rows)  # every rank's rows, each question once
        self.evals.append({"step": trainer.global_step, "ids": [r["id"] for r in rows],
                           "metrics": eval_metrics(rows),
                           "logged": {k: float(v) for k, v in trainer.callback_metrics.items()
                                      if k.startswith("eval/")}})

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps,
                  "evals": self.evals, "saves": self.saves, "sampler_digest": self.sampler_digest}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RankMicroBatches(GRPOModule):
    """GRPOModule whose loss passes go one group per micro-batch on rank 1 and in one pass on rank 0:
    under DDP the two ranks then make different numbers of backward passes per update."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.hparams.loss_tokens_per_micro_batch = 1 if self.global_rank == 1 else 10**9
