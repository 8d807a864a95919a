"""Checkpoints: trainable weights only, an adapter in PEFT format beside each, removed together; the
exported adapter is the trained policy, also when GRPO started from an SFT adapter (`init_adapter`)."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from callbacks.export import AdapterCheckpoint, ExportAdapter, save_adapter
from data.datamodule import QADataModule
from grpo.infer import load_for_inference
from grpo.module import GRPOModule
from models.loading import add_lora, load_model_and_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

IDS = torch.arange(40).reshape(2, 20)  # (B, T) byte ids of the tiny model's vocabulary
SFT_TARGETS = ("q_proj", "v_proj", "down_proj")  # fewer than GRPO's: the export adapts the union


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()  # (B, T, V)


def randomize_lora_b(model, seed: int, std: float = 0.5) -> None:
    """LoRA starts with B = 0 (a no-op): give B weights, as training would, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_sft_adapter(folder, dtype: str = "float32") -> str:
    """A random SFT adapter (rank 4, α 8, non-zero B) on the tiny model, saved as a PEFT folder."""
    with torch.random.fork_rng():
        torch.manual_seed(1)  # LoRA's A is drawn from the global RNG
        sft = add_lora(load_model_and_tokenizer("tiny", dtype)[0], r=4, alpha=8, target_modules=SFT_TARGETS)
    randomize_lora_b(sft, seed=1)
    sft.save_pretrained(folder)
    return str(folder)


def grpo_policy(init_adapter: str | None, dtype: str = "float32"):
    """The GRPO policy as `AgentModule.configure_model` builds it, its fresh adapters moved (rank 2, α 4)."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        policy = add_lora(load_model_and_tokenizer("tiny", dtype)[0], r=2, alpha=4, init_adapter=init_adapter)
    randomize_lora_b(policy, seed=2, std=0.2)
    return policy


def test_adapter_beside_each_checkpoint_loads_with_peft(tmp_path):
    """The adapter beside the last checkpoint is the trained policy: not the weights before training
    (the KL to π_ref moves an adapter that starts away from it, whatever the rewards' luck)."""
    from peft import PeftModel

    L.seed_everything(0)
    module = GRPOModule(model_name="tiny", group_size=2, max_new_tokens=8, lr=5e-2, warmup_ratio=0.0)
    module.configure_model()
    randomize_lora_b(module.policy, seed=3, std=0.2)
    before = logits(module.policy)
    ckpt = AdapterCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=1,
                             monitor="step", mode="max")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(module, QADataModule(task="offline", batch_size=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.adapter", "step=3.ckpt"]  # older ones removed
    base, _ = load_model_and_tokenizer("tiny")
    restored = PeftModel.from_pretrained(base, str(tmp_path / "step=3.adapter"))
    want = logits(module.policy)
    assert not torch.allclose(want, before, atol=1e-4), "training should have moved the adapter"
    torch.testing.assert_close(logits(restored), want, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- init_adapter


def test_export_with_init_adapter_is_the_policy(tmp_path):
    """Policy = base + SFT adapter (merged) + GRPO adapter: the exported folder, loaded onto the raw
    base with PEFT, gives the policy's logits, and adapts the union of both adapters' modules."""
    from peft import PeftModel

    policy = grpo_policy(make_sft_adapter(tmp_path / "sft"))
    save_adapter(policy, tmp_path / "export")
    restored = PeftModel.from_pretrained(load_model_and_tokenizer("tiny")[0], tmp_path / "export")
    want, got = logits(policy), logits(restored)
    assert not torch.allclose(want, logits(load_model_and_tokenizer("tiny")[0]), atol=1e-2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    adapted = {n.rsplit(".", 1)[-1] for n, m in restored.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_export_with_init_adapter_bf16(tmp_path):
    """bf16 policy: the export holds the adapter weights in the policy's adapter dtype and gives the
    policy's logits up to bf16 rounding (the SFT update was rounded into the bf16 base weights)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    policy = grpo_policy(make_sft_adapter(tmp_path / "sft", "bfloat16"), "bfloat16")
    save_adapter(policy, tmp_path / "export")
    adapter_dtypes = {p.dtype for n, p in policy.named_parameters() if "lora_" in n}
    assert {t.dtype for t in load_file(tmp_path / "export" / "adapter_model.safetensors").values()} == adapter_dtypes
    base = load_model_and_tokenizer("tiny", "bfloat16")[0]
    want = logits(policy)
    got = logits(PeftModel.from_pretrained(base, tmp_path / "export"))
    no_sft = logits(grpo_policy(None, "bfloat16"))  # the GRPO adapter alone on the raw base
    assert (got - want).abs().max() < 0.05 * (no_sft - want).abs().max()


def test_export_without_init_adapter_is_unchanged(tmp_path):
    """No init adapter: the export is PEFT's own `save_pretrained` of the fresh adapter, byte for byte."""
    policy = grpo_policy(None)
    save_adapter(policy, tmp_path / "export")
    policy.save_pretrained(tmp_path / "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name


def test_export_never_deletes_what_is_not_an_adapter(tmp_path):
    """The export replaces its folder whole: an old adapter is replaced, a folder that holds anything else
    (here a TensorBoard log dir) is refused by name and left as it was — by `save_adapter`, by the CLI, and by
    `ExportAdapter` at setup, before training, when its dirpath holds the logger's log dir."""
    from types import SimpleNamespace

    from callbacks.export import main

    policy = grpo_policy(None)
    save_adapter(policy, tmp_path / "export")
    save_adapter(policy, tmp_path / "export")                                         # an adapter: replaced
    run = tmp_path / "run"
    (run / "version_0").mkdir(parents=True)
    (run / "version_0" / "events.out").write_text("logs")
    with pytest.raises(ValueError, match=r"holds \['version_0'\]"):
        save_adapter(policy, run)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "export"), str(run)])
    assert (run / "version_0" / "events.out").read_text() == "logs"
    trainer = SimpleNamespace(log_dir=str(run / "version_0"))
    with pytest.raises(ValueError, match="log dir"):
        ExportAdapter(dirpath=str(run)).setup(trainer, None, "fit")
    ExportAdapter(dirpath=str(tmp_path / "fresh")).setup(trainer, None, "fit")        # a folder of its own: fine
    ExportAdapter().setup(trainer, None, "fit")                                       # default: <log dir>/adapter


def test_checkpoint_adapter_with_init_adapter_is_the_policy(tmp_path):
    """Through a real fit: `step=N.adapter` (PEFT, and `grpo.infer --checkpoint`) and `step=N.ckpt`
    (`grpo.infer --checkpoint`) both give the trained policy's logits."""
    from peft import PeftModel

    L.seed_everything(0)
    module = GRPOModule(model_name="tiny", group_size=2, max_new_tokens=8, lr=5e-2, warmup_ratio=0.0,
                        init_adapter=make_sft_adapter(tmp_path / "sft"))
    module.configure_model()
    randomize_lora_b(module.policy, seed=2, std=0.2)  # as if trained for a while (fit keeps this policy)
    ckpt = AdapterCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(module, QADataModule(task="offline", batch_size=2))
    want = logits(module.policy)
    with module.policy.disable_adapter():
        assert not torch.allclose(want, logits(module.policy), atol=1e-2), "the GRPO adapter should matter"
    adapter = tmp_path / "ckpt" / "step=2.adapter"
    peft_logits = logits(PeftModel.from_pretrained(load_model_and_tokenizer("tiny")[0], adapter))
    torch.testing.assert_close(peft_logits, want, atol=1e-5, rtol=1e-5)
    # grpo.infer merges the adapters into the fp32 weights: rounding of W + s·B·A, ~1e-5 on these logits
    torch.testing.assert_close(logits(load_for_inference(str(adapter), "tiny")[0]), want, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(logits(load_for_inference(str(tmp_path / "ckpt" / "step=2.ckpt"))[0]), want,
                               atol=5e-5, rtol=1e-5)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4 + module.hparams.lora_r


def test_reference_of_a_lora_run_from_a_cold_start_is_the_sft_policy(tmp_path):
    """GRPO with LoRA on top of an SFT adapter: π_ref is base + SFT (merged), not the raw base and not the
    trained policy (its fresh adapters moved here)."""
    from peft import PeftModel

    sft = make_sft_adapter(tmp_path / "sft")
    m = GRPOModule(model_name="tiny", init_adapter=sft, lora_r=2, lora_alpha=4, beta=0.1)
    m.configure_model()
    randomize_lora_b(m.policy, seed=3, std=0.2)
    from models.loading import reference_policy
    with torch.no_grad(), reference_policy(m.policy.eval(), m.ref_model) as ref_model:  # what the module scores
        ref = ref_model(input_ids=IDS).logits.float()
    sft_policy = PeftModel.from_pretrained(load_model_and_tokenizer("tiny")[0], sft).merge_and_unload()
    torch.testing.assert_close(ref, logits(sft_policy), atol=1e-5, rtol=1e-5)
    assert (ref - logits(load_model_and_tokenizer("tiny")[0])).abs().max() > 1e-2   # not the raw base
    assert (ref - logits(m.policy)).abs().max() > 1e-2                              # not the policy
