"""GRPO for tool-using language models, hand-written in PyTorch Lightning (no TRL).

Read in this order: `rollout.py` (sampling with in-loop tool calls; `kvcache.py` is the batch
and KV cache of its forwards) → `rewards.py` → `losses.py` (advantages, k3 KL, clipped surrogate)
→ `logprobs.py` → `module.py` (`GRPOModule.training_step`, the algorithm as numbered steps) →
`metrics.py` (every logged metric and its formula) → `sft.py` (cold start). `agent.py`
(`AgentModule`, the Lightning base GRPO and SFT share) is plumbing (model loading and LoRA are the
`models` package's); `cli.py` is the command line.

Shapes (every shape comment in the package uses these letters; a file adds its own local ones)
    B   prompts (questions) in a batch
    G   group size: completions sampled per prompt
    N   = B*G samples; sample n answers prompt n // G (the G samples of a prompt are consecutive)
    P   prompt tokens (left-padded to the longest prompt)
    C   completion tokens: sampled and observation tokens, right-padded to the longest completion
    L   tokens in one forward pass (a decode step, a tool turn, a length bucket, an SFT batch)
    V   vocabulary
T is the sampling temperature, never a length.

References
    GRPO      Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1 (eq. 3; outcome advantages §4.1.2)
    k3 KL     Schulman 2020, "Approximating KL divergence" (DeepSeekMath eq. 4)
    PPO clip  Schulman et al. 2017, arXiv 1707.06347
    Dr. GRPO  Liu et al. 2025, arXiv 2503.20783 (no std scaling; length bias of per-sequence means)
    DAPO      Yu et al. 2025, arXiv 2503.14476 (token-level loss, clip-higher ε_high)
    OTC       Wang et al. 2025, arXiv 2504.14870 (tool-efficiency reward, tool productivity)
    Search-R1 Jin et al. 2025, arXiv 2503.09516 (masking retrieved tokens from the loss)
    HotpotQA  Yang et al. 2018 (answer normalization, EM and F1)

Where we depart from the GRPO paper, and why
    * The loss averages over every sampled token of the batch (DAPO / Dr. GRPO), not per
      sequence first: per-sequence means favour short correct and long wrong answers.
      `token_level=False` restores the paper's form.
    * Tool observations are forced tokens: they stay in attention but get no gradient and no KL
      (Search-R1). The paper has no tools.
    * The reward is shaped (value-of-information table, or OTC), not a plain 0/1 outcome.
    * The reference policy is the SFT policy (the cold-start adapter merged, fresh LoRA
      disabled), not the raw base model; with LoRA it costs no memory.
    * Sampling is in the weights' dtype even under bf16 autocast (autocast casts every weight at
      every decode step), or in a cast copy of them (`rollout_dtype`, e.g. bf16 on hardware with
      fast bf16 matmuls).
    * π_old is the distribution the rollout sampled from, recorded at each decode step
      (`Rollout.sample_logp`), not a recomputation: no extra pass, and at μ = 1 the ratio then
      carries the sampler/learner numerical gap (fp32 or bf16 decode vs the loss pass's
      precision), which the clip bounds.
    * Under DDP the token-level loss is rescaled by the global token count (`ddp_token_scale`),
      so that the gradient average equals the single-process loss.
"""
