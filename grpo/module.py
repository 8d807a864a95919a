"""`GRPOModule`: GRPO with in-loop tool calls, as one LightningModule.

`training_step` is the algorithm, one call per step:

    1. rollout      G completions per question; `<call>` runs the search tool mid-generation
    2. reward       value-of-information (or OTC) reward of every completion
    3. advantages   Â_i = (r_i - mean_group) / (std_group + ε)
    4. log-probs    π_old (only when μ > 1) and π_ref (only when β > 0), without gradient
    5. update       μ steps on the clipped surrogate + β·KL(k3), completion tokens only

The maths lives in `grpo.losses` and `grpo.rewards` (pure, tested functions); sampling in
`grpo.rollout`; this file only combines them. Optimization is manual so that the μ inner
updates of step 5 are plain to see. Shapes: B prompts, G group size, N = B*G, C completion tokens.
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch

from data.types import QAExample
from grpo.logprobs import completion_logprobs
from grpo.losses import group_advantages, grpo_loss
from grpo.models import (DEFAULT_LORA_TARGETS, SMOLLM2, add_lora, check_4bit, check_model_name, frozen_copy,
                         load_model_and_tokenizer, reference_policy)
from grpo.prompts import build_prompt
from grpo.rewards import (OTCWeights, VOIWeights, check_finite_rewards, exact_match, f1_score, otc_group_rewards,
                          parse_completion, voi_reward)
from grpo.rollout import Rollout, rollout

REWARDS = ("voi", "otc")


def eval_metrics(rows: list[dict]) -> dict[str, float]:
    """Means of the per-question evaluation rows, overall and per kind (memory / lookup).

    eval/em, eval/f1        answer quality (HotpotQA EM / F1)
    eval/well_formed        share of completions that are well-formed and end in an answer
    eval/calls_per_sample   executed tool calls per question
    eval/search_rate        share of questions with at least one call
    eval/tokens_per_sample  sampled tokens per question
    """
    def means(rs):
        n = len(rs)
        return {"em": sum(r["em"] for r in rs) / n, "f1": sum(r["f1"] for r in rs) / n,
                "well_formed": sum(r["well_formed"] for r in rs) / n,
                "calls_per_sample": sum(r["calls"] for r in rs) / n,
                "search_rate": sum(r["calls"] > 0 for r in rs) / n,
                "tokens_per_sample": sum(r["tokens"] for r in rs) / n}
    out = {f"eval/{k}": v for k, v in means(rows).items()}
    for kind in sorted({r["kind"] for r in rows}):
        out |= {f"eval/{kind}/{k}": v for k, v in means([r for r in rows if r["kind"] == kind]).items()}
    return out


def cosine_with_warmup(step: int, total_steps: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up over warmup_ratio·total steps, then cosine decay to 0."""
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ddp_token_scale(local_tokens: torch.Tensor, global_tokens: torch.Tensor, world_size: int) -> torch.Tensor:
    """Factor that makes DDP's gradient average equal the token-level loss of the whole batch.

    Rank r's loss is a token mean S_r / T_r over its own T_r completion tokens, and DDP averages
    gradients over the W ranks: (1/W) Σ_r ∇(S_r / T_r). The token-level loss of the global batch
    is Σ_r S_r / T with T = Σ_r T_r, which needs every rank to weigh its mean by T_r·W / T:
        (1/W) Σ_r ∇(T_r·W/T · S_r/T_r) = ∇(Σ_r S_r / T).
    (PITFALLS: "normalise by the token count of the whole batch, once".) Equal T_r give 1.
    """
    return local_tokens * world_size / global_tokens.clamp(min=1)


def gather_eval_rows(rows: list[dict]) -> list[dict]:
    """Under DDP, the evaluation rows of every rank, each question once; else `rows` unchanged.

    Lightning's DistributedSampler pads the validation set with repeated questions so that every
    rank gets as many; keeping the first row of each (id, question) counts every question once.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    per_rank: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(per_rank, rows)
    seen, unique = set(), []
    for row in (row for rank_rows in per_rank for row in rank_rows):
        if (row["id"], row["question"]) not in seen:
            seen.add((row["id"], row["question"]))
            unique.append(row)
    return unique


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"model.{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


class PolicyModule(L.LightningModule):
    """What GRPO and SFT share: the policy (LoRA or full) and tokenizer, the optimizer and schedule,
    agentic rollouts and their evaluation, and checkpoints of the trainable weights only.

    Subclasses document every argument and call `save_hyperparameters()`.
    """

    def __init__(self, model_name: str = SMOLLM2, dtype: str = "float32", load_in_4bit: bool = False,
                 lora: bool = True, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, init_adapter: str | None = None,
                 lr: float = 2e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 max_grad_norm: float = 1.0, max_new_tokens: int = 256, max_tool_calls: int = 5,
                 max_obs_tokens: int = 160, top_p: float = 1.0, eval_temperature: float = 0.0,
                 eval_max_new_tokens: int | None = None, seed: int = 0):
        super().__init__()
        check_model_name(model_name)
        for name in ("max_new_tokens", "max_obs_tokens", "top_p"):
            _positive(name, locals()[name])
        _positive("max_tool_calls", max_tool_calls, allow_zero=True)
        _positive("eval_temperature", eval_temperature, allow_zero=True)
        if top_p > 1:
            raise ValueError(f"model.top_p={top_p}: must be in (0, 1]")
        check_4bit(load_in_4bit)
        if lora:
            _positive("lora_r", lora_r)
            _positive("lora_alpha", lora_alpha)
        _positive("lr", lr)
        _positive("weight_decay", weight_decay, allow_zero=True)
        _positive("max_grad_norm", max_grad_norm, allow_zero=True)
        if eval_max_new_tokens is not None:
            _positive("eval_max_new_tokens", eval_max_new_tokens)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout={lora_dropout!r}: must be in [0, 1)")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"model.warmup_ratio={warmup_ratio!r}: must be in [0, 1)")
        self.policy = None  # built in configure_model, after every option has been checked
        self.ref_model = None
        self.tokenizer = None
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.automatic_optimization = False
        self.sampler = torch.Generator().manual_seed(seed)  # the rollout's RNG, saved in checkpoints
        self.env = None  # the search tool; taken from the datamodule in setup()
        self._eval_rows: list[dict] = []
        self.last_eval: dict[str, float] = {}  # metrics of the latest evaluation (read by callbacks)
        self.last_eval_rows: list[dict] = []

    def setup(self, stage: str) -> None:
        # every rank samples its own random stream (a checkpoint restores each rank's own state)
        self.sampler.manual_seed(self.hparams.seed + 1_000_003 * self.global_rank)
        dm = getattr(self.trainer, "datamodule", None)
        if self.env is None and dm is not None and hasattr(dm, "search_env"):
            self.env = dm.search_env()
        if self.env is None:
            raise ValueError(f"{type(self).__name__} needs a search env: use QADataModule or set module.env")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        model, self.tokenizer = load_model_and_tokenizer(hp.model_name, hp.dtype, hp.load_in_4bit, seed=hp.seed)
        if hp.lora:
            model = add_lora(model, hp.lora_r, hp.lora_alpha, hp.lora_dropout, tuple(hp.lora_targets),
                             hp.init_adapter)
        elif getattr(hp, "beta", 0) > 0:
            self.ref_model = frozen_copy(model)  # full fine-tuning: π_ref is a frozen copy
        self.policy = model

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, total, self.hparams.warmup_ratio))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def optimize(self, loss: torch.Tensor) -> None:
        """One optimizer step on `loss` (manual optimization)."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()

    def rollout(self, batch: list[QAExample], temperature: float, group_size: int,
                max_new_tokens: int | None = None) -> Rollout:
        prompts = [build_prompt(self.tokenizer, ex.question) for ex in batch]
        was_training = self.policy.training
        self.policy.eval()
        # bf16 autocast makes CPU decoding ~4x slower here (small matmuls): decode in the weights' dtype
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda" and torch.is_autocast_enabled()):
            ro = rollout(self.policy, self.tokenizer, prompts, self.env, group_size,
                         max_new_tokens or self.hparams.max_new_tokens, temperature, self.hparams.top_p,
                         self.hparams.max_tool_calls, self.hparams.max_obs_tokens, generator=self.sampler)
        self.policy.train(was_training)
        return ro

    # ---- evaluation: agentic rollouts on held-out questions
    def validation_step(self, batch: list[QAExample], batch_idx: int) -> None:
        """Rollouts at `eval_temperature` (0: greedy): accuracy, format, tokens and tool use."""
        ro = self.rollout(batch, temperature=self.hparams.eval_temperature, group_size=1,
                          max_new_tokens=self.hparams.eval_max_new_tokens or self.hparams.max_new_tokens)
        for i, ex in enumerate(batch):
            parsed = parse_completion(ro.texts[i])
            self._eval_rows.append({
                "kind": ex.kind, "em": exact_match(parsed.answer or "", ex.answers),
                "f1": f1_score(parsed.answer or "", ex.answers),
                "well_formed": float(parsed.well_formed and parsed.answer is not None),
                "calls": float(ro.num_calls[i]), "tokens": float(ro.completion_mask[i].sum()),
                "id": ex.id, "question": ex.question, "text": ro.texts[i]})

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        rows, self._eval_rows = gather_eval_rows(self._eval_rows), []  # every rank: the whole validation set
        if not rows:
            return
        metrics = eval_metrics(rows)
        self.last_eval, self.last_eval_rows = metrics, rows
        self.log_dict(metrics, sync_dist=True)  # already equal on every rank: the mean over ranks keeps them
        if not self.trainer.sanity_checking:
            self.print(f"[eval step {self.global_step}] " + "  ".join(
                f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items() if "/" not in k[5:]))

    on_test_epoch_end = on_validation_epoch_end

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a batch is a list of QAExample records: text, no tensors

    # ---- checkpoints hold the trainable weights and the sampler's RNG, nothing frozen
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sampler_rng"] = _all_ranks(self.sampler.get_state())  # [state of rank 0, rank 1, ...]

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
        self.sampler.set_state(states[self.global_rank])


def _all_ranks(obj) -> list:
    """[obj of rank 0, rank 1, ...] under torch.distributed, else [obj]."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class GRPOModule(PolicyModule):
    def __init__(self, model_name: str = SMOLLM2, dtype: str = "float32", load_in_4bit: bool = False,
                 lora: bool = True, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                 lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS, init_adapter: str | None = None,
                 group_size: int = 8, max_new_tokens: int = 256, max_tool_calls: int = 5,
                 max_obs_tokens: int = 160, temperature: float = 1.0, top_p: float = 1.0,
                 reward: str = "voi", voi_weights: VOIWeights | None = None, otc_weights: OTCWeights | None = None,
                 scale_by_std: bool = True, beta: float = 0.04, clip_eps: float = 0.2,
                 clip_eps_high: float | None = None, token_level: bool = True, num_updates: int = 1,
                 lr: float = 2e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 max_grad_norm: float = 1.0, eval_temperature: float = 0.0, eval_max_new_tokens: int | None = None,
                 seed: int = 0):
        """
        Args:
            model_name: "smollm2-135m-instruct" (default, offline), "tiny" (random, tests), a HF folder or hub id.
            dtype: weights' dtype: float32 | bfloat16 | float16. (bf16 decoding is slower on this CPU.)
            load_in_4bit: NF4 weights through bitsandbytes (meant for CUDA; allowed on CPU with a warning).
            lora: train LoRA adapters (True) or every weight (False, with a frozen copy as π_ref).
            lora_r: LoRA rank r.
            lora_alpha: LoRA scale α (the update is scaled by α/r).
            lora_dropout: dropout on the LoRA input.
            lora_targets: module names that get adapters.
            init_adapter: a PEFT adapter folder (the SFT cold start) merged in first; π_ref is then the SFT policy.
            group_size: G, completions sampled per question.
            max_new_tokens: budget of sampled tokens per completion (observations not counted).
            max_tool_calls: executed calls per completion; past it the env answers with a budget notice.
            max_obs_tokens: an observation is cut to this many tokens.
            temperature: sampling temperature (the loss uses the same one).
            top_p: nucleus sampling threshold.
            reward: "voi" (value-of-information table) or "otc" (OTC-GRPO tool-efficiency reward).
            voi_weights: weights of the VOI table (None: the defaults).
            otc_weights: weights of the OTC reward (None: the defaults).
            scale_by_std: divide advantages by the group std (GRPO) or not (Dr. GRPO).
            beta: β, weight of the KL to the reference policy; 0 skips the reference pass.
            clip_eps: ε of the clipped surrogate.
            clip_eps_high: upper ε (DAPO clip-higher); None means ε.
            token_level: average the loss over all completion tokens of the batch (True) or per sequence first.
            num_updates: μ, policy updates per rollout batch.
            lr: peak learning rate (AdamW), reached after warm-up, then cosine decay.
            weight_decay: AdamW weight decay.
            warmup_ratio: share of the steps spent warming up.
            max_grad_norm: gradient clipping by global norm (0: off).
            eval_temperature: temperature of evaluation rollouts (0: greedy).
            eval_max_new_tokens: token budget of evaluation rollouts (None: max_new_tokens).
            seed: seed of the tiny model's weights and of the rollout sampler.
        """
        super().__init__(
            model_name=model_name, dtype=dtype, load_in_4bit=load_in_4bit, lora=lora, lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, init_adapter=init_adapter,
            lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
            max_new_tokens=max_new_tokens, max_tool_calls=max_tool_calls, max_obs_tokens=max_obs_tokens, top_p=top_p,
            eval_temperature=eval_temperature, eval_max_new_tokens=eval_max_new_tokens, seed=seed)
        if group_size < 2:
            raise ValueError(f"model.group_size={group_size}: GRPO needs at least 2 completions per group")
        for name in ("temperature", "clip_eps", "num_updates"):
            _positive(name, locals()[name])
        _positive("beta", beta, allow_zero=True)
        if clip_eps_high is not None:
            _positive("clip_eps_high", clip_eps_high)
        if reward not in REWARDS:
            raise ValueError(f"model.reward={reward!r}: expected one of {REWARDS}")
        self.save_hyperparameters()
        self.voi_weights = voi_weights or VOIWeights()
        self.otc_weights = otc_weights or OTCWeights()

    # ------------------------------------------------------------------ the algorithm
    def training_step(self, batch: list[QAExample], batch_idx: int):
        hp, G = self.hparams, self.hparams.group_size
        t0 = time.perf_counter()
        # 1. rollout: G completions per question, tool calls executed inside the loop
        ro = self.rollout(batch, temperature=hp.temperature, group_size=G)
        t_rollout = time.perf_counter() - t0
        # 2. reward of every completion, and its components
        rewards, parts = self.compute_rewards(ro, batch)                                    # (N,), {k: (N,)}
        # 3. group-relative advantages
        advantages, zero_std = group_advantages(rewards, G, hp.scale_by_std)                # (N,), (B,)
        # 4. log-probs of π_old (μ > 1 only) and π_ref (β > 0 only), no gradient
        old_logp, ref_logp = self.frozen_logprobs(ro)                                       # (N, C) or None
        # 5. μ policy updates: clipped surrogate + β·KL on the sampled tokens only
        token_scale = self.token_scale(ro.completion_mask)                                  # (), 1 on one process
        for _ in range(hp.num_updates):
            logp = completion_logprobs(self.policy, ro, hp.temperature)                     # (N, C)
            out = grpo_loss(logp, old_logp, ref_logp, advantages, ro.completion_mask, hp.clip_eps,
                            hp.clip_eps_high, hp.beta, hp.token_level)
            self.optimize(out.loss * token_scale)
        self.lr_schedulers().step()
        # 6. log
        self.log_step(ro, rewards, parts, zero_std, out, t_rollout, time.perf_counter() - t0, len(batch),
                      token_scale)
        # what callbacks (tool metrics, transcripts) read in on_train_batch_end
        return {"loss": out.loss.detach(), "rollout": ro, "rewards": rewards, "components": parts,
                "token_scale": token_scale}

    # ------------------------------------------------------------------ the steps
    def compute_rewards(self, ro: Rollout, batch: list[QAExample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total reward (N,) and each component (N,) of every completion."""
        G = ro.group_size
        if self.hparams.reward == "voi":
            parts = [voi_reward(ro.texts[n], batch[n // G].answers, int(ro.num_calls[n]),
                                int(ro.num_calls_no_obs[n]), self.voi_weights) for n in range(len(ro.texts))]
        else:
            parts = []
            for b, ex in enumerate(batch):
                s = slice(b * G, (b + 1) * G)
                parts += otc_group_rewards(ro.texts[s], ex.answers, ro.num_calls[s].tolist(), self.otc_weights)
        check_finite_rewards(parts, [f"{batch[n // G].id}#{n % G}" for n in range(len(parts))])
        components = {k: torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in parts[0]}
        return components.pop("total").to(self.device), components

    @torch.no_grad()
    def token_scale(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """`ddp_token_scale` of this rank under DDP with the token-level loss, else 1.

        The loss is a token mean over the local batch and DDP averages gradients over ranks: that
        is the token mean of the global batch only when every rank has as many completion tokens.
        Rescaling by T_r·W/T (one all-reduce of the token count) normalises by the token count of
        the whole batch, once (PITFALLS, "Length bias of per-sequence means").
        """
        world_size = self.trainer.world_size
        if not self.hparams.token_level or world_size == 1:
            return torch.ones((), device=self.device)
        local_tokens = completion_mask.sum().float()                                        # ()
        global_tokens = self.trainer.strategy.reduce(local_tokens.clone(), reduce_op="sum")  # () Σ_r T_r
        return ddp_token_scale(local_tokens, global_tokens, world_size)

    @torch.no_grad()
    def frozen_logprobs(self, ro: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hp = self.hparams
        old_logp = completion_logprobs(self.policy, ro, hp.temperature) if hp.num_updates > 1 else None
        ref_logp = None
        if hp.beta > 0:
            with reference_policy(self.policy, self.ref_model) as ref:
                ref_logp = completion_logprobs(ref, ro, hp.temperature)
        return old_logp, ref_logp

    def log_step(self, ro, rewards, parts, zero_std, out, t_rollout, t_step, batch_size, token_scale=1.0) -> None:
        """Every metric is the mean over ranks (sync_dist): the global mean for per-sample means, as
        ranks hold B·G samples each. Token-mean losses are scaled by `token_scale` first, so that their
        mean over ranks is the token mean of the global batch; std and clip_frac are rank means."""
        sampled = ro.completion_mask.sum(1).float()                                          # (N,)
        metrics = {
            "loss/policy": out.policy_loss * token_scale, "loss/kl": out.kl * token_scale,
            "loss/total": out.loss.detach() * token_scale,
            "loss/clip_frac": out.clip_frac,
            "reward/mean": rewards.mean(), "reward/std": rewards.std(),
            "reward/frac_zero_std": zero_std.float().mean(),
            **{f"reward/{k}": v.mean() for k, v in parts.items()},
            "tools/calls_per_sample": ro.num_calls.float().mean(),
            "tools/no_obs_per_sample": ro.num_calls_no_obs.float().mean(),
            "tools/errors_per_sample": ro.tool_errors.float().mean(),
            "rollout/tokens_per_sample": sampled.mean(),
            "rollout/truncated_frac": ro.truncated.float().mean(),
            "time/rollout_s": t_rollout, "time/step_s": t_step,
        }
        self.log_dict(metrics, batch_size=batch_size, sync_dist=True)
        self.log_dict({"reward": rewards.mean(), "calls": ro.num_calls.float().mean(), "s/step": t_step},
                      prog_bar=True, logger=False, batch_size=batch_size, sync_dist=True)
