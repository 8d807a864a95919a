"""Checkpoints: trainable weights only, an adapter in PEFT format beside each, removed together."""
from __future__ import annotations

import lightning as L
import torch

from callbacks.export import AdapterCheckpoint
from data.datamodule import QADataModule
from grpo.models import load_model_and_tokenizer
from grpo.module import GRPOModule


def test_adapter_beside_each_checkpoint_loads_with_peft(tmp_path):
    from peft import PeftModel

    L.seed_everything(0)
    module = GRPOModule(model_name="tiny", group_size=2, max_new_tokens=8, lr=5e-2, warmup_ratio=0.0)
    ckpt = AdapterCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=1,
                             monitor="step", mode="max")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(module, QADataModule(task="offline", batch_size=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.adapter", "step=3.ckpt"]  # older ones removed
    base, _ = load_model_and_tokenizer("tiny")
    restored = PeftModel.from_pretrained(base, str(tmp_path / "step=3.adapter")).eval()
    ids = torch.arange(40).reshape(2, 20)
    module.policy.eval()
    with torch.no_grad():
        want, got = module.policy(input_ids=ids).logits, restored(input_ids=ids).logits
        with module.policy.disable_adapter():
            base_logits = module.policy(input_ids=ids).logits
    assert not torch.allclose(want, base_logits), "training should have moved the adapter"
    assert torch.allclose(got, want, atol=1e-6)
