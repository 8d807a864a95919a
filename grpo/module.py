"""`GRPOModule`: GRPO with in-loop tool calls, as one LightningModule.

`training_step` is the algorithm, one call per step:

    1. rollout      G completions per question; `<call>` runs the search tool mid-generation
    2. reward       value-of-information (or OTC) reward of every completion, judged once
    3. advantages   Â_i = (r_i - mean_group) / (std_group + ε)
    4. log-probs    π_old: recorded by the rollout as it sampled; π_ref (only when β > 0), no gradient
    5. update       μ steps on the clipped surrogate + β·KL(k3), completion tokens only; each step's
                    backward goes a micro-batch of whole groups at a time (memory bounded by
                    `loss_tokens_per_micro_batch`), then one optimizer step
    6. log          the step's means (`grpo.metrics`); callbacks get the rollout and its judgements
    7. redraw       questions whose group split between searching and answering directly go back to
                    the prompt queue, when the loader takes them (`data.replay_slots`)

The maths lives in `grpo.losses`, `grpo.rewards` and `grpo.metrics` (pure, tested functions);
sampling in `grpo.rollout`; this file only combines them. Optimization is manual so that the μ inner
updates of step 5 are plain to see. Shapes: B, G, N = B*G, C (see `grpo/__init__.py`).
"""
from __future__ import annotations

import random
import time
import warnings

import torch
from torch import Tensor

from data.types import QAExample
from envs.search import EmptySearch
from grpo.agent import AgentModule, check_positive
from grpo.logprobs import completion_logprobs, loss_micro_batches
from grpo.losses import GRPOLossOutput, Normaliser, group_advantages, grpo_loss, split_groups, sum_losses
from grpo.metrics import step_metrics
from grpo.rewards import (OTCWeights, VOIWeights, answer_grounded, check_finite_rewards, judge, otc_group_rewards,
                          voi_reward)
from grpo.rollout import Rollout
from models.frozen_casts import frozen_casts
from models.loading import SMOLLM2, frozen_copy, reference_policy

REWARDS = ("voi", "otc")
REDRAWS = ("split", "direct_right")


def ddp_token_scale(local_tokens: torch.Tensor, global_tokens: torch.Tensor, world_size: int) -> torch.Tensor:
    """Factor that makes DDP's gradient average equal the token-level loss of the whole batch.

    Rank r's loss is a token mean S_r / M_r over its own M_r sampled tokens, and DDP averages
    gradients over the W ranks: (1/W) Σ_r ∇(S_r / M_r). The token-level loss of the global batch
    is Σ_r S_r / M with M = Σ_r M_r, which needs every rank to weigh its mean by M_r·W / M:
        (1/W) Σ_r ∇(M_r·W/M · S_r/M_r) = ∇(Σ_r S_r / M).
    (PITFALLS: "normalise by the token count of the whole batch, once".) Equal M_r give 1.
    """
    return local_tokens * world_size / global_tokens.clamp(min=1)


class GRPOModule(AgentModule):
    """GRPO with in-loop tool calls. The options shared with SFT (model, LoRA, optimizer, sampling
    budgets, evaluation) are `AgentModule`'s; these are GRPO's own."""

    def __init__(self, group_size: int = 8, temperature: float = 1.0, top_p: float = 1.0, reward: str = "voi",
                 voi_weights: VOIWeights | None = None, otc_weights: OTCWeights | None = None,
                 scale_by_std: bool = True, beta: float = 0.04, clip_eps: float = 0.2,
                 clip_eps_high: float | None = None, token_level: bool = True, num_updates: int = 1,
                 loss_tokens_per_micro_batch: int = 2048, tool_outage_rate: float = 0.0, redraw: str = "split",
                 **kwargs):
        """
        Args:
            group_size: G, completions sampled per question.
            temperature: sampling temperature of training rollouts (the loss scores the same one).
            top_p: nucleus threshold of training rollouts: must be 1, since the loss scores the full softmax
                and a truncated sampler would be scored as another distribution (use eval_top_p).
            reward: "voi" (value-of-information table) or "otc" (OTC-GRPO tool-efficiency reward).
            voi_weights: weights of the VOI table (None: the defaults).
            otc_weights: weights of the OTC reward (None: the defaults).
            scale_by_std: divide advantages by the group std (GRPO) or not (Dr. GRPO).
            beta: β, weight of the KL to the reference policy; 0 skips the reference pass.
            clip_eps: ε of the clipped surrogate.
            clip_eps_high: upper ε (DAPO clip-higher); None means ε.
            token_level: average the loss over all completion tokens of the batch (True) or per sequence first.
            num_updates: μ, policy updates per rollout batch (each is one optimizer step: trainer.max_steps
                counts them).
            loss_tokens_per_micro_batch: the loss passes (π_ref, and the policy's forward + backward) take the
                batch in micro-batches of whole groups of at most this many tokens (prompts once, completions
                with their observations, no padding; a larger group goes alone). Gradient, loss and logged
                values are those of one pass over the batch; only memory changes. Peak memory grows with the
                largest micro-batch: SmolLM2, fp32, LoRA: ~1.25 GB + 2.3-3.1 MB per token (more for longer rows;
                benchmarks/PERF.md). Measured on a B = 8, G = 8 rollout of 10,888 tokens whose largest group
                (two searches per sample) has 2,616: 2048 → update peak 10.4 GB in fp32, 7.6-7.8 GB under bf16
                autocast (one pass: ~26 GB predicted); 1024 → 9.4 GB (that group goes alone: a budget
                cannot cut a group). Smaller budgets cost little time (groups of ~230 tokens: no slower).
            tool_outage_rate: share of the training questions whose search tool is down: every call of their G
                samples finds nothing (`envs.search.EmptySearch`), so that answering from memory after an empty
                search is rewarded, and looping on it is not. Drawn per question from (seed, step, rank, index);
                validation and test always search the real tool.
            redraw: which questions step 7 asks the loader to draw again (only when `data.replay_slots` > 0):
                "split", those whose group split between searching and answering without a search;
                "direct_right", only those of them where a sample answered right without a search.
        """
        if top_p != 1.0:
            raise ValueError(f"model.top_p={top_p}: GRPO training must sample the distribution its loss scores (the "
                             f"full softmax at model.temperature); use model.eval_top_p for evaluation rollouts")
        if group_size < 2:
            raise ValueError(f"model.group_size={group_size}: GRPO needs at least 2 completions per group")
        for name in ("temperature", "clip_eps", "num_updates", "loss_tokens_per_micro_batch"):
            check_positive(name, locals()[name])
        check_positive("beta", beta, allow_zero=True)
        if clip_eps_high is not None:
            check_positive("clip_eps_high", clip_eps_high)
        if reward not in REWARDS:
            raise ValueError(f"model.reward={reward!r}: expected one of {REWARDS}")
        if redraw not in REDRAWS:
            raise ValueError(f"model.redraw={redraw!r}: expected one of {REDRAWS}")
        if not 0.0 <= tool_outage_rate <= 1.0:
            raise ValueError(f"model.tool_outage_rate={tool_outage_rate!r}: must be in [0, 1]")
        super().__init__(**kwargs)
        if self.hparams.lora and self.hparams.lora_dropout > 0:
            warnings.warn(f"model.lora_dropout={self.hparams.lora_dropout}: rollouts sample without dropout (eval "
                          f"mode) and the loss pass applies it, so ρ = π_θ/π_old carries dropout noise even at "
                          f"μ = 1 (π_ref runs without it); GRPO here is meant to run with 0")
        self.voi_weights = voi_weights or VOIWeights()
        self.otc_weights = otc_weights or OTCWeights()
        self.ref_model = None  # π_ref of full fine-tuning (a frozen copy); with LoRA, the adapters disabled

    # ------------------------------------------------------------------ the algorithm
    def training_step(self, batch: list[QAExample], batch_idx: int):
        hp, G = self.hparams, self.hparams.group_size
        t0 = time.perf_counter()
        # 1. rollout: G completions per question, tool calls executed inside the loop (by a tool that is
        #    down for a share `tool_outage_rate` of the questions)
        envs = self.training_envs(len(batch))
        ro = self.rollout(batch, temperature=hp.temperature, group_size=G, env=envs)
        t_rollout = time.perf_counter() - t0
        # 2. reward of every completion, its components, and whether its answer is correct
        rewards, parts, correct = self.compute_rewards(ro, batch)                           # (N,), {k: (N,)}, (N,)
        # 3. group-relative advantages
        advantages, zero_std = group_advantages(rewards, G, hp.scale_by_std)                # (N,), (B,)
        # 4. log-probs: π_old is what the rollout sampled from; π_ref (β > 0 only), no gradient
        micro = loss_micro_batches(ro, hp.loss_tokens_per_micro_batch)                      # [(n,) rows], whole groups
        old_logp = ro.sample_logp                                                           # (N, C)
        # under autocast the frozen weights are cast once for 4-5, not at every call (entered before π_ref's
        # disabled adapters, which peft marks frozen: the LoRA matrices keep autocast's own cast)
        with frozen_casts(self.policy):
            ref_logp = self.reference_logprobs(ro, micro)                                   # (N, C) or None
            # 5. μ policy updates: clipped surrogate + β·KL on the sampled tokens only
            share = self.token_share(ro.completion_mask)                                    # (), 1 on one process
            token_scale = share if hp.token_level else torch.ones_like(share)               # the loss's DDP factor
            for _ in range(hp.num_updates):
                out = self.policy_update(ro, micro, old_logp, ref_logp, advantages, token_scale)  # + one LR step
        # 6. log the step's means, over ranks too (grpo.metrics: every metric and its formula)
        metrics = step_metrics(ro, rewards, parts, zero_std, out, token_scale, share)
        metrics |= {"time/rollout_s": t_rollout, "time/step_s": time.perf_counter() - t0}
        if hp.tool_outage_rate > 0:
            metrics["tools/outage_share"] = sum(isinstance(e, EmptySearch) for e in envs) / len(envs)
        # 7. redraw the questions whose group split between searching and answering (data.loader.ReplayBatches)
        right = correct if hp.redraw == "direct_right" else None
        metrics |= self.ask_redraws(split_groups(ro.num_calls + ro.num_calls_no_obs, G, right))
        self.log_dict(metrics, batch_size=len(batch), sync_dist=True)
        # what callbacks (per-kind tool metrics, transcripts) read in on_train_batch_end
        return {"loss": out.loss.detach(), "rollout": ro, "rewards": rewards, "components": parts,
                "correct": correct, "token_scale": token_scale}

    # ------------------------------------------------------------------ the steps
    def training_envs(self, num_questions: int) -> list:
        """The search tool of each training question: `self.env`, or for a share `tool_outage_rate` of them
        a tool that finds nothing. The draw depends on (seed, global step, rank, index) only, so a resumed
        run draws what the uninterrupted one would have."""
        hp = self.hparams
        down = [random.Random(f"{hp.seed}/{self.global_step}/{self.global_rank}/{b}").random() < hp.tool_outage_rate
                for b in range(num_questions)]
        empty = EmptySearch(getattr(self.env, "max_chars", 600))
        return [empty if d else self.env for d in down]

    def compute_rewards(self, ro: Rollout, batch: list[QAExample]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Total reward (N,), each component {k: (N,)}, and whether each answer is correct (N,) bool.

        Each completion is read once (`judge`: correct, well-formed); the reward is a function of
        those two facts and of the rollout's tool-call counts."""
        G, N = ro.group_size, len(ro.texts)
        golds = [batch[n // G].answers for n in range(N)]
        correct, well_formed = map(list, zip(*(judge(text, g) for text, g in zip(ro.texts, golds))))
        if self.hparams.reward == "voi":
            parts = [voi_reward(correct[n], well_formed[n], int(ro.num_calls[n]), int(ro.num_calls_no_obs[n]),
                                self.voi_weights, answer_grounded(ro.texts[n], batch[n // G].question))
                     for n in range(N)]
        else:
            parts = []
            for b in range(len(batch)):
                s = slice(b * G, (b + 1) * G)
                attempted = (ro.num_calls[s] + ro.num_calls_no_obs[s]).tolist()  # refused and unclosed calls cost too
                parts += otc_group_rewards(correct[s], well_formed[s], attempted, self.otc_weights)
        check_finite_rewards(parts, [f"{batch[n // G].id}#{n % G}" for n in range(N)])
        components = {k: torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in parts[0]}
        return components.pop("total").to(self.device), components, torch.tensor(correct, dtype=torch.bool)

    def ask_redraws(self, again: Tensor) -> dict[str, float]:
        """Tell the training loader which questions of this batch to draw again (again: (B,) bool), when
        it takes redraws (`data.replay_slots` > 0); returns the data/ metrics to log (none otherwise)."""
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if not hasattr(loader, "feedback"):
            return {}
        redrawn = loader.redrawn  # of the batch just trained on, before the feedback
        loader.feedback(again.tolist())
        return {"data/redrawn_share": redrawn / len(again), "data/split_share": again.float().mean().item(),
                "data/queue": float(len(loader.queue))}

    @torch.no_grad()
    def token_share(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """This rank's share of the batch's sampled tokens, M_r·W/M (`ddp_token_scale`); 1 on one process.

        A token mean over the local batch, averaged over ranks (DDP's gradient average, `sync_dist`), is
        the token mean of the global batch only when every rank has as many completion tokens. Scaled
        by M_r·W/M (one all-reduce of the token count) it is: the token-level loss is normalised by the
        token count of the whole batch, once (PITFALLS, "Length bias of per-sequence means"), and so
        are the logged token means (loss/clip_frac, loss/ratio_mean).
        """
        world_size = self.trainer.world_size
        if world_size == 1:
            return torch.ones((), device=self.device)
        local_tokens = completion_mask.sum().float()                                        # ()
        global_tokens = self.trainer.strategy.reduce(local_tokens.clone(), reduce_op="sum")  # () Σ_r M_r
        return ddp_token_scale(local_tokens, global_tokens, world_size)

    @torch.no_grad()
    def reference_logprobs(self, ro: Rollout, micro: list[Tensor] | None = None) -> torch.Tensor | None:
        """log π_ref of the completion tokens (N, C), or None when β = 0 (no KL term, no pass).

        π_ref is the frozen copy (full fine-tuning) or the policy with its LoRA adapters disabled:
        the SFT policy when GRPO starts from a cold-start adapter, never the policy being trained.
        Computed a micro-batch of rows at a time (`micro`: in order, every row once; None: in one).
        """
        if self.hparams.beta == 0:
            return None
        micro = [torch.arange(len(ro.texts), device=ro.input_ids.device)] if micro is None else micro
        with reference_policy(self.policy, self.ref_model) as ref, frozen_casts(self.ref_model):  # copy: cast once
            return torch.cat([completion_logprobs(ref, ro.select(rows), self.hparams.temperature)
                              for rows in micro])                                           # (N, C)

    def policy_update(self, ro: Rollout, micro: list[Tensor], old_logp: Tensor, ref_logp: Tensor | None,
                      advantages: Tensor, token_scale: Tensor) -> GRPOLossOutput:
        """One update of step 5: the gradient of the batch's loss -J, accumulated a micro-batch of whole
        groups at a time, then one optimizer step (and one LR step). Returns the batch's loss output.

        Each micro-batch's `grpo_loss` is normalised by the whole batch's counts (`Normaliser`: M tokens
        or N' sequences), so its loss is its share of the batch's; the shares' gradients add up to the
        gradient of one pass, while only one micro-batch's graph is held at a time. Under DDP the
        gradients are averaged over ranks once, at the last micro-batch (whatever each rank's count).
        """
        hp = self.hparams
        normaliser = Normaliser.of(ro.completion_mask)                                      # M, N' of the batch
        parts = []
        for i, rows in enumerate(micro):
            logp = completion_logprobs(self.policy, ro.select(rows), hp.temperature)        # (n, C)
            part = grpo_loss(logp, old_logp[rows], None if ref_logp is None else ref_logp[rows], advantages[rows],
                             ro.completion_mask[rows], hp.clip_eps, hp.clip_eps_high, hp.beta, hp.token_level,
                             normaliser=normaliser)
            self.accumulate_grad(part.loss * token_scale, sync=i == len(micro) - 1)         # gradients add up
            parts.append(part)
        self.step_optimizer()
        return sum_losses(parts)

    # ------------------------------------------------------------------ plumbing
    @property
    def updates_per_batch(self) -> int:
        return self.hparams.num_updates  # μ

    def configure_model(self) -> None:
        built = self.policy is None
        super().configure_model()
        if built and not self.hparams.lora and self.hparams.beta > 0:
            self.ref_model = frozen_copy(self.policy)  # full fine-tuning: π_ref is a frozen copy

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_cold_start()
        super().setup(stage)

    def check_cold_start(self) -> None:
        """Refuse to train a model known not to speak the tool format without a cold start."""
        hp = self.hparams
        if hp.model_name == SMOLLM2 and hp.init_adapter is None:
            raise ValueError(f"model.model_name={SMOLLM2!r} with model.init_adapter=None: the raw model writes no "
                             f"<answer>/<call> tags (0/96), so every group would score the same and nothing "
                             f"would be learned; run a cold start first (configs/sft_smollm2.yaml, or "
                             f"configs/sft_hotpotqa.yaml) and set model.init_adapter to its adapter folder")
