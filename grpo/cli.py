"""The Lightning CLI of the project: GRPO and SFT modules, the QA datamodule, YAML configs."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from data.datamodule import QADataModule


def main(args=None, run: bool = True) -> LightningCLI:
    """Build the CLI; `model.class_path` picks the module (grpo.module.GRPOModule, grpo.sft.SFTModule)."""
    return LightningCLI(
        L.LightningModule, QADataModule, subclass_mode_model=True,
        save_config_kwargs={"overwrite": True}, args=args, run=run,
    )
