"""`AgentModule`: the Lightning base of a tool-using agent, what the GRPO and SFT modules share.

The agent is a policy network (LoRA adapters or every weight) with its tokenizer and its search
tool (`env`, taken from the datamodule). This class holds what both ways of training it need:
AdamW with a cosine schedule after a linear warm-up, agentic rollouts (`grpo.rollout`), their
evaluation on held-out questions (`grpo.evaluation.EvaluationHooks`), and checkpoints that hold
the trainable weights only plus every rank's rollout RNG. It has no `training_step`: GRPO's is
`grpo.module.GRPOModule.training_step`, SFT's `grpo.sft.SFTModule.training_step`.
"""
from __future__ import annotations

import math
import warnings

import lightning as L
import torch

from data.types import QAExample
from envs.protocol import build_prompt
from grpo.evaluation import EvaluationHooks, all_ranks
from grpo.rollout import Rollout, rollout
from models.loading import (DEFAULT_LORA_TARGETS, DTYPES, SMOLLM2, add_lora, check_4bit, check_model_name,
                            eval_mode, load_model_and_tokenizer, weights_in)
from models.lora import merged_lora


def cosine_with_warmup(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio·total steps, then cosine decay to 0."""
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_length(num_updates: int, batches: int | float, max_steps: int, max_epochs: int | None,
                    batches_per_epoch: int | float) -> int:
    """Optimizer steps in the whole run: the length of the LR schedule.

    Under manual optimization Lightning counts optimizer steps in `global_step` and stops when it
    reaches `trainer.max_steps`; a GRPO batch makes μ = num_updates of them. So `max_steps` counts
    optimizer updates (μ per rollout batch) and the run makes
        min(max_steps, μ · batches_per_epoch · max_epochs)
    steps. `batches` is Lightning's `estimated_stepping_batches`, which counts batches, not steps;
    it is exact when μ = 1. A max_steps that μ does not divide would stop inside a batch's μ
    updates (Lightning checks between batches): refused, naming both options.
    """
    if num_updates == 1:
        return max(1, int(batches))
    if max_steps != -1 and max_steps % num_updates:
        raise ValueError(f"trainer.max_steps={max_steps} is not a multiple of model.num_updates={num_updates}: "
                         f"max_steps counts optimizer updates, {num_updates} per rollout batch")
    limits = [max_steps] if max_steps != -1 else []
    if max_epochs not in (None, -1) and math.isfinite(batches_per_epoch):
        limits.append(num_updates * int(batches_per_epoch) * max_epochs)
    if not limits:
        raise ValueError("set trainer.max_steps or trainer.max_epochs: the LR schedule needs the run's length")
    return max(1, min(limits))


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"model.{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: the instructions that make a bf16 matmul faster than fp32 on a CPU. Without them
    oneDNN emulates bf16 (AVX-512: 3-4x slower than fp32) or cannot pack it at all (AVX2 only: ~8x slower)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


def warn_if_bf16_is_slow(device_type: str, uses_bf16: bool, native_bf16: bool) -> None:
    """bf16 on a CPU without bf16 instructions (`cpu_has_fast_bf16`) is no speed-up but a slow-down: a
    (512 x 576) @ (576 x 1536) matmul takes 61 ms in bf16 against 7.5 ms in fp32 on a 2-core AVX2-only EPYC.
    Warned, not refused: the numbers are right, only slow."""
    if uses_bf16 and device_type == "cpu" and not native_bf16:
        warnings.warn("bf16 is used on a CPU without bf16 instructions (no AVX512-BF16, no AMX): bf16 matmuls run "
                      "3-8x slower than fp32 here; prefer --trainer.precision 32-true and no --model.rollout_dtype "
                      "(README, Design choices)")


class AgentModule(EvaluationHooks, L.LightningModule):
    """What GRPO and SFT share: the policy (LoRA or full) and tokenizer, the optimizer and schedule,
    agentic rollouts and their evaluation, and checkpoints of the trainable weights only.

    The options both share are declared here, once; a subclass declares only its own and passes the
    rest through `**kwargs` (LightningCLI follows `super().__init__(**kwargs)` and shows and checks
    them all). Every option ends up in `self.hparams`.
    """

    def __init__(self, model_name: str = SMOLLM2, dtype: str = "float32", load_in_4bit: bool = False,
                 lora: bool = True, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, init_adapter: str | None = None,
                 lr: float = 2e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 max_grad_norm: float = 1.0, max_new_tokens: int = 256, max_tool_calls: int = 5,
                 max_obs_tokens: int = 160, eval_temperature: float = 0.0,
                 eval_max_new_tokens: int | None = None, seed: int = 0, show_budget: bool = False,
                 eval_top_p: float = 1.0, rollout_dtype: str | None = None):
        """
        Args:
            model_name: "smollm2-135m-instruct" (default, offline), "tiny" (random, tests), a HF folder or hub id.
            dtype: weights' dtype: float32 | bfloat16 | float16.
            load_in_4bit: NF4 weights through bitsandbytes (meant for CUDA; allowed on CPU with a warning).
            lora: train LoRA adapters (True) or every weight (False; GRPO then keeps a frozen copy as π_ref).
            lora_r: LoRA rank r.
            lora_alpha: LoRA scale α (the update is scaled by α/r).
            lora_dropout: dropout on the LoRA input.
            lora_targets: module names that get adapters.
            init_adapter: a PEFT LoRA folder (the SFT cold start) merged into the weights first; the trained
                policy and π_ref then start from it, and exported adapters include it.
            lr: peak learning rate (AdamW), reached after warm-up, then cosine decay to 0.
            weight_decay: AdamW weight decay.
            warmup_ratio: share of the optimizer steps spent warming up.
            max_grad_norm: gradient clipping by global norm (0: off).
            max_new_tokens: budget of sampled tokens per completion (observations not counted).
            max_tool_calls: executed calls per completion; past it the env answers with a budget notice.
            max_obs_tokens: an observation is cut to this many tokens (in SFT traces too).
            eval_temperature: temperature of evaluation rollouts (0: greedy).
            eval_max_new_tokens: token budget of evaluation rollouts (None: max_new_tokens).
            seed: seed of the tiny model's weights and of the rollout sampler.
            show_budget: end each observation with the searches left ("[2 searches left]"), the Budget
                Tracker of "Budget-Aware Tool-Use Enables Effective Agent Scaling"; SFT traces, GRPO
                rollouts and evaluation alike (train the cold start with the same setting).
            eval_top_p: nucleus threshold of evaluation rollouts (eval_temperature > 0).
            rollout_dtype: dtype the rollouts decode in (a copy of the weights, LoRA merged): None = the
                weights' own. "bfloat16" is faster where bf16 matmuls are (GPUs; CPUs with AVX512_BF16 or
                AMX: `benchmarks/matmul_dtype.py`); the sampler is then a rounded copy of the policy, and
                GRPO's π_old stays what was sampled (the rollout's record), so the ratio carries the gap.
                Validation rollouts decode the same way (greedy figures of the rounded policy; validate
                without the option for fp32 figures). Only fp32 weights get LoRA merged for decoding
                (`models.lora.merged_lora`): bf16 weights with rollout_dtype float32 decode unmerged.
        """
        super().__init__()
        check_model_name(model_name)
        check_4bit(load_in_4bit)
        for name in ("max_new_tokens", "max_obs_tokens", "lr", *(("lora_r", "lora_alpha") if lora else ()),
                     *(("eval_max_new_tokens",) if eval_max_new_tokens is not None else ())):
            check_positive(name, locals()[name])
        for name in ("max_tool_calls", "eval_temperature", "weight_decay", "max_grad_norm"):
            check_positive(name, locals()[name], allow_zero=True)
        if rollout_dtype is not None and rollout_dtype not in DTYPES:
            raise ValueError(f"model.rollout_dtype={rollout_dtype!r}: expected None or one of {sorted(DTYPES)}")
        if not 0 < eval_top_p <= 1:
            raise ValueError(f"model.eval_top_p={eval_top_p}: must be in (0, 1]")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout={lora_dropout!r}: must be in [0, 1)")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio={warmup_ratio!r}: must be in [0, 1)")
        self.save_hyperparameters()  # this class's options and the subclass's own (Lightning collects both)
        self.policy = None  # built in configure_model, after every option has been checked
        self.tokenizer = None
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.automatic_optimization = False
        self._sampler: torch.Generator | None = None  # the rollout's RNG (see `sampler`), saved in checkpoints
        self._sampler_state: tuple[str, torch.Tensor] | None = None  # (device type, state) from a checkpoint
        self.env = None  # the search tool; taken from the datamodule in setup()

    @property
    def sampler(self) -> torch.Generator:
        """The rollout's RNG, on the module's device: the sampler's `torch.rand` needs its generator on the
        device of the probabilities (a CPU generator with CUDA logits raises). Made on first use after
        the module moved: from this rank's state in the loaded checkpoint, else seeded with
        seed + 1,000,003·rank, so that every rank samples its own stream."""
        if self._sampler is None or self._sampler.device != self.device:
            self._sampler = torch.Generator(self.device)
            saved = self._sampler_state
            if saved is not None and saved[0] == self.device.type:
                self._sampler.set_state(saved[1])
            else:
                if saved is not None:
                    warnings.warn(f"the checkpoint's rollout RNG was saved on {saved[0]!r}, this run samples on "
                                  f"{self.device.type!r}: the sampling stream restarts from the seed")
                self._sampler.manual_seed(self.hparams.seed + 1_000_003 * self.global_rank)
            self._sampler_state = None
        return self._sampler

    @property
    def rollout_torch_dtype(self) -> torch.dtype | None:
        """The dtype rollouts decode in when it is not the policy's own (`rollout_dtype`), else None."""
        name = self.hparams.get("rollout_dtype")
        return None if name is None or name == self.hparams.dtype else DTYPES[name]

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps per training batch (GRPO: μ)."""
        return 1

    def setup(self, stage: str) -> None:
        precision = str(getattr(self._trainer, "precision", ""))  # no trainer: a bare module in a test
        warn_if_bf16_is_slow(self.device.type, "bf16" in precision or self.hparams.dtype == "bfloat16"
                             or self.rollout_torch_dtype == torch.bfloat16,
                             cpu_has_fast_bf16())
        self._sampler = None  # every run starts its rank's stream from the seed (or the checkpoint's state)
        dm = getattr(self.trainer, "datamodule", None)
        if self.env is None and dm is not None and hasattr(dm, "search_env"):
            self.env = dm.search_env()
        if self.env is None:
            raise ValueError(f"{type(self).__name__} needs a search env: use QADataModule or set module.env")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        # the SFT init adapter is merged first: LoRA or full fine-tuning, π_ref is the SFT policy (trl #3194)
        model, self.tokenizer = load_model_and_tokenizer(hp.model_name, hp.dtype, hp.load_in_4bit, seed=hp.seed,
                                                         init_adapter=hp.init_adapter)
        if hp.lora:
            model = add_lora(model, hp.lora_r, hp.lora_alpha, hp.lora_dropout, tuple(hp.lora_targets))
        self.policy = model.train()  # HF loads in eval mode; LoRA dropout (if any) should act in training

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        t = self.trainer
        total = schedule_length(self.updates_per_batch, t.estimated_stepping_batches, t.max_steps, t.max_epochs,
                                t.num_training_batches)  # estimated_stepping_batches sets up the data first
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, total, self.hparams.warmup_ratio))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def accumulate_grad(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Add ∇loss to the gradients (they accumulate until `step_optimizer`). Under DDP the gradients are
        averaged over ranks only when `sync`: a step accumulated over micro-batches syncs at its last one
        (every rank then makes one all-reduce per step, whatever its number of micro-batches)."""
        with self.optimizers().toggle_model(sync_grad=sync):
            self.manual_backward(loss)

    def step_optimizer(self) -> None:
        """Clip the accumulated gradients, one optimizer step, clear the gradients, one LR step.

        The schedule steps with every optimizer step, so it spans the run's `schedule_length` updates
        whatever μ is, and the LR of update k is lr · cosine_with_warmup(k, total, warmup_ratio).
        """
        opt = self.optimizers()
        if self.hparams.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    def rollout(self, batch: list[QAExample], temperature: float, group_size: int,
                max_new_tokens: int | None = None, top_p: float = 1.0, env=None,
                generator: torch.Generator | None = None) -> Rollout:
        """G completions per question; `env`: the tool, or one per question (None: `self.env`);
        `generator`: the RNG to sample with (None: the training stream, `sampler`)."""
        prompts = [build_prompt(self.tokenizer, ex.question) for ex in batch]
        # sampled in eval mode (no dropout; every submodule's mode given back after); LoRA merged into the
        # weights while decoding (one matmul per adapted Linear, not three), restored bit-identical after
        # (`models.lora.merged_lora`: when it merges and when it cannot); then decoded in `rollout_dtype` (a cast
        # copy, `weights_in`), not under autocast: autocast casts every weight at every decode step, which made
        # CPU decoding ~4x slower on a host without bf16 hardware
        with eval_mode(self.policy), merged_lora(self.policy) as policy, \
                weights_in(policy, self.rollout_torch_dtype), \
                torch.autocast(self.device.type, enabled=self.device.type == "cuda" and torch.is_autocast_enabled()):
            return rollout(policy, self.tokenizer, prompts, self.env if env is None else env, group_size,
                           max_new_tokens or self.hparams.max_new_tokens, temperature, top_p,
                           self.hparams.max_tool_calls, self.hparams.max_obs_tokens,
                           generator=self.sampler if generator is None else generator,
                           show_budget=self.hparams.get("show_budget", False))

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a batch is a list of QAExample records: text, no tensors

    # ---- checkpoints hold the trainable weights and the sampler's RNG, nothing frozen
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sampler_rng"] = all_ranks(self.sampler.get_state())  # [state of rank 0, rank 1, ...]
        checkpoint["sampler_device"] = self.device.type

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("sampler_rng")
        if states is None:
            return
        if isinstance(states, torch.Tensor):  # a single state: one process
            states = [states]
        world = self.trainer.world_size if self._trainer is not None else 1
        if len(states) != world:
            raise ValueError(f"the checkpoint holds sampler states of {len(states)} processes, this run has "
                             f"{world}: resume with as many devices as the run that saved it")
        # applied when the sampler is next made on the module's device (it may not be there yet)
        self._sampler_state = (checkpoint.get("sampler_device", "cpu"), states[self.global_rank])
        self._sampler = None
