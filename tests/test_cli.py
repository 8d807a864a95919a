"""The command line: every shipped YAML parses, and the tiny config trains and logs."""
from __future__ import annotations

from pathlib import Path

import pytest

from grpo.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config):
    """Parsing builds the module and datamodule (options checked, no weights loaded).

    A GPU config on a machine without CUDA fails at once with Lightning's own message; its
    model and data options are then checked with the accelerator overridden to cpu."""
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    args = ["-c", str(config)]
    if "accelerator: gpu" in config.read_text() and not torch.cuda.is_available():
        with pytest.raises(MisconfigurationException, match="gpu"):
            main(args, run=False)
        args += ["--trainer.accelerator", "cpu"]
    if "../shared/data" in config.read_text() and not Path("../shared/data/hotpotqa").is_dir():
        with pytest.raises(FileNotFoundError, match="data.train_path"):  # a user's clone has no shared/
            main(args, run=False)
        return
    cli = main(args, run=False)
    assert cli.model.hparams and cli.datamodule is not None


@pytest.mark.parametrize("flag", ["--model.beta", "--model.init_args.beta"])
def test_dot_override_reaches_the_module(flag):
    cli = main(["-c", "configs/tiny.yaml", flag, "0.1"], run=False)
    assert cli.model.hparams.beta == 0.1


@pytest.mark.parametrize("args, message", [
    (["--model.init_args.group_size", "1"], "model.group_size=1"),
    (["--model.init_args.lr=-1e-3"], "model.lr=-0.001"),
])
def test_bad_override_names_the_option(args, message):
    with pytest.raises(ValueError, match=message):
        main(["-c", "configs/tiny.yaml", *args], run=False)


def test_tiny_fit_runs_and_logs(tmp_path):
    """`python -m grpo fit -c configs/tiny.yaml` end to end; TensorBoard gets the scalars."""
    main(["fit", "-c", "configs/tiny.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for tag in ("loss/policy", "loss/kl", "reward/mean", "reward/frac_zero_std", "tools/calls_per_sample",
                "rollout/tokens_per_sample", "loss/clip_frac", "reward/correct", "eval/em"):
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    import torch
    state = torch.load(ckpts[0], weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), "checkpoint must hold the trainable (LoRA) weights only"


@pytest.mark.parametrize("config", [c for c in CONFIGS if "GRPOModule" in c.read_text()], ids=lambda p: p.name)
def test_grpo_configs_on_smollm2_start_from_a_cold_start(config):
    """SmolLM2 writes no tags on its own: every GRPO config on it names an init_adapter, and a config
    makes that adapter (an SFT config exporting to the same folder) or it is a published one (a PEFT
    folder committed under results/)."""
    import yaml

    args = yaml.safe_load(config.read_text())["model"]["init_args"]
    if args.get("model_name") != "smollm2-135m-instruct":
        return
    adapter = args.get("init_adapter")
    assert adapter, f"{config.name}: GRPO on SmolLM2 without model.init_adapter"
    published = Path(__file__).parents[1] / adapter
    if adapter.startswith("results/") and (published / "adapter_config.json").is_file():
        return
    makers = [c.name for c in CONFIGS if "SFTModule" in c.read_text() and f"dirpath: {adapter}" in c.read_text()]
    assert makers, f"{config.name}: no SFT config exports {adapter}"
