"""Export the policy as a LoRA adapter in PEFT format (loadable with `PeftModel.from_pretrained` on
the raw base model): at the end of `fit` (`ExportAdapter`) and beside every checkpoint
(`AdapterCheckpoint`). When training started from an init adapter (the SFT cold start, merged into
the base), the export is both adapters stacked into one (`models.lora.export_lora`), so that it is
the trained policy and not only its GRPO update.

An adapter folder in another dtype (how the adapters under results/ are published, in bf16):

    python -m callbacks.export runs/x/version_0/checkpoints/last.adapter results/economy/grpo_adapter

and with `--rank K` cut to rank K (`models.lora.truncate_lora`: each update's top K singular values;
stacked adapters grow by r per run), printing the relative error of the updates it cut.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from data.files import atomic_write_dir
from models.lora import ADAPTER_WEIGHTS, cast_adapter, export_lora, read_adapter, truncate_lora, write_adapter
from models.loading import DTYPES

ADAPTER_FILES = frozenset({"adapter_config.json", ADAPTER_WEIGHTS, "README.md"})  # what PEFT writes


def check_replaceable(target: Path) -> None:
    """An export replaces its folder whole: refuse a `target` that holds anything but an adapter's files
    (a log dir, a checkpoint), naming what it would delete, or that is a file."""
    target = Path(target)
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ADAPTER_FILES)
        if foreign:
            raise ValueError(f"adapter folder {target} holds {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, "
                             f"not only an adapter; the export replaces the folder whole and would delete them: "
                             f"choose another folder")
    elif target.exists():
        raise ValueError(f"adapter folder {target}: is a file")


def save_adapter(policy, target: Path) -> Path:
    """Write the policy's adapter (`export_lora`) to `target` atomically: a temporary folder, then a rename
    (`check_replaceable` first)."""
    check_replaceable(target)
    return atomic_write_dir(Path(target), lambda tmp: export_lora(policy, tmp))


class ExportAdapter(L.Callback):
    """At the end of `fit`, save the policy's adapter to `dirpath` (default: <log dir>/adapter)."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before training, not after it: `dirpath` must be replaceable and must not hold the run's logs
        (the logger writes into its log dir during the run; the export would then delete them)."""
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        if stage != "fit" or self.dirpath is None:
            return
        target = Path(self.dirpath).resolve()
        if log_dir is not None and (target == Path(log_dir).resolve() or target in Path(log_dir).resolve().parents):
            raise ValueError(f"ExportAdapter dirpath={self.dirpath!r} holds the logger's log dir {log_dir!r}: the "
                             f"export at the end of fit would delete the logs; give it a folder of its own")
        check_replaceable(target)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        if not trainer.is_global_zero or not hasattr(pl_module.policy, "peft_config"):
            return
        target = Path(self.dirpath or Path(log_dir or trainer.default_root_dir) / "adapter")
        save_adapter(pl_module.policy, target)
        pl_module.print(f"adapter saved: {target}")


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus the LoRA adapter in PEFT format beside each checkpoint.

    `step=8.ckpt` gets `step=8.adapter/` (adapter_config.json + adapter_model.safetensors),
    loadable with `PeftModel.from_pretrained(base, path)`; it is removed with its checkpoint.
    The `.ckpt` itself holds only the trainable weights (see `AgentModule.on_save_checkpoint`)
    and is written atomically (`AtomicCheckpointIO`, installed in `setup` unless the strategy
    already has a custom checkpoint IO).
    (Overrides ModelCheckpoint's `_save_checkpoint` / `_remove_checkpoint`, Lightning 2.6.)
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    @staticmethod
    def adapter_path(ckpt_path: str) -> Path:
        return Path(ckpt_path).with_suffix(".adapter")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        policy = getattr(trainer.lightning_module, "policy", None)
        if trainer.is_global_zero and hasattr(policy, "peft_config"):
            save_adapter(policy, self.adapter_path(filepath))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(self.adapter_path(filepath), ignore_errors=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then `os.replace`.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in
    $TMPDIR: when that is another filesystem, the commit copies into the checkpoint in place,
    and a crash during that copy destroys the previous checkpoint. A rename within one
    directory is atomic: a reader sees the old file or the new one, never half of one.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def truncate_adapter(source: Path, folder: Path, rank: int, dtype: torch.dtype) -> dict[str, float]:
    """Write the PEFT LoRA folder `source` cut to `rank` (`truncate_lora`) into `folder`, weights in
    `dtype`; returns each module's relative Frobenius error."""
    deltas, config = read_adapter(source)
    cut, errors = truncate_lora(deltas, rank)
    write_adapter(cut, folder, dtype, config.get("base_model_name_or_path"), config.get("lora_dropout", 0.0))
    return errors


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Copy a PEFT LoRA adapter folder with its weights in another dtype, "
                                             "optionally cut to a lower rank.")
    ap.add_argument("source", type=Path, help="a PEFT adapter folder (e.g. a checkpoint's step=N.adapter)")
    ap.add_argument("target", type=Path, help="the folder to write (replaced atomically)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--rank", type=int, default=None,
                    help="cut every update to its best rank-K approximation (default: keep the rank)")
    args = ap.parse_args(argv)
    if args.rank is not None and args.rank < 1:
        ap.error(f"--rank {args.rank}: expected a positive integer")
    errors: dict[str, float] = {}
    try:
        check_replaceable(args.target)
        if args.rank is None:
            atomic_write_dir(args.target, lambda tmp: cast_adapter(args.source, tmp, DTYPES[args.dtype]))
        else:
            atomic_write_dir(args.target, lambda tmp: errors.update(
                truncate_adapter(args.source, tmp, args.rank, DTYPES[args.dtype])))
    except (FileNotFoundError, ValueError) as err:
        ap.error(str(err))
    print(f"written: {args.target} ({args.dtype})")
    if errors:
        cut = sorted(errors.values())
        if any(cut):
            print(f"rank {args.rank}: relative error of the updates (Frobenius) median {cut[len(cut) // 2]:.3f}, "
                  f"max {cut[-1]:.3f} over {len(cut)} modules")
        else:
            print(f"rank {args.rank}: no update was above it, the adapter keeps its rank (exact)")


if __name__ == "__main__":
    main()
