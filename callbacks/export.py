"""Export the trained LoRA adapter in PEFT format (loadable with `PeftModel.from_pretrained`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L


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
