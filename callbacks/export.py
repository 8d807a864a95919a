"""Export LoRA adapters in PEFT format (loadable with `PeftModel.from_pretrained`): at the end of
`fit` (`ExportAdapter`) and beside every checkpoint (`AdapterCheckpoint`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def save_adapter(policy, target: Path) -> Path:
    """Write the adapter to `target` atomically: a temporary folder, then a rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        policy.save_pretrained(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class ExportAdapter(L.Callback):
    """At the end of `fit`, save the policy's adapter to `dirpath` (default: <log dir>/adapter)."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

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
    The `.ckpt` itself holds only the trainable weights (see `PolicyModule.on_save_checkpoint`)
    and is written by Lightning through an fsspec transaction: a temporary file, then a rename.
    (Overrides ModelCheckpoint's `_save_checkpoint` / `_remove_checkpoint`, Lightning 2.6.)
    """

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
