"""One GRPO step of `configs/grpo_smollm2.yaml`, piece by piece, next to each piece's floor.

The config's model arguments build the policy (SmolLM2-135M-Instruct, LoRA r 16); its first
offline training batch (B = 2) is rolled out with tools on (G = 8). Then, under the config's
precision (bf16-mixed: autocast), the pieces of `GRPOModule.training_step` are timed one by one:

    rollout            prefill, decode steps (1 new token per row), observation forwards
                       (a tool turn feeds several tokens), tool time (the search env), the rest
                       (sampling, tag search, book-keeping)
    reward             `compute_rewards`
    reference pass     log π_ref, adapters disabled, no gradient
    policy fwd / bwd   log π_θ + `grpo_loss`, then its backward
    optimizer          gradient clipping + AdamW step

The two loss passes are timed for both implementations in the same process:
`completion_logprobs_padded` (the plain one, as before) and `completion_logprobs` (prompt
once per group, no padding, chunked log-prob of the sampled token).

Floors, from this machine's measured peaks (PITFALLS): bf16 matmul ~1,700 GFLOP/s, fp32 ~270,
memory ~25 GB/s. A forward costs 2·n_params FLOPs per token, a LoRA backward ~2·n_params more
(input gradients; the frozen weights get none). A decode step reads every weight once, so its
floor is max(weight bytes / 25 GB/s, 2·n_params·rows / peak). Useful tokens are the real ones
(each prompt once, completions without padding); "computed" counts what the pass really feeds.

Without the SFT adapter (`outputs/sft_smollm2_adapter`, absent on a fresh machine) the policy
is SmolLM2 with a fresh LoRA, which writes almost no tags: completions run to the token budget
and tools are rarely called. `--synthetic` then also times the loss passes on a rollout with
the shape of an SFT policy's (same prompts, completion lengths spread over 40..500 tokens with
observation blocks: as long and as ragged as the 16 x 500 batches measured in the README).

    python benchmarks/grpo_step.py [--synthetic] [--threads 1] [--repeats 3] [--rollout-dtype bfloat16]

The rollout is the module's own (`GRPOModule.rollout`: LoRA merged, decoded in `model.rollout_dtype`).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

PEAK = {"bf16": 1700e9, "fp32": 270e9}
MEM_BW = 25e9


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timed:
    """Wraps the search env: total seconds spent in the tool."""

    def __init__(self, env):
        self.env, self.seconds, self.calls = env, 0.0, 0

    def __call__(self, query):
        t0 = time.perf_counter()
        try:
            return self.env(query)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def timed_rollout(module, batch, G):
    """The module's rollout (`GRPOModule.rollout`: LoRA merged, decoded in `rollout_dtype`) with a forward hook
    on the policy: time of prefill / decode / observation forwards."""
    log = []  # (input shape, seconds)
    pre = module.policy.register_forward_pre_hook(lambda m, a, k: log.append([tuple(k["input_ids"].shape), time.perf_counter()]),
                                                   with_kwargs=True)
    post = module.policy.register_forward_hook(lambda m, a, k, o: log[-1].__setitem__(1, time.perf_counter() - log[-1][1]),
                                               with_kwargs=True)
    env = Timed(module.env)
    t0 = time.perf_counter()
    ro = module.rollout(batch, temperature=module.hparams.temperature, group_size=G, env=env)
    total = time.perf_counter() - t0
    pre.remove(), post.remove()
    prefill = log[0][1]
    decode = [(s, t) for s, t in log[1:] if s[1] == 1]
    obs = [(s, t) for s, t in log[1:] if s[1] > 1]
    return ro, {"total": total, "prefill": prefill, "decode": decode, "obs": obs, "tool": env.seconds,
                "calls": env.calls}


def synthetic_rollout(ro, vocab: int, seed: int = 0):
    """The same prompts, SFT-like completions: lengths spread over 40..500, observation blocks inside."""
    from grpo.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    N, P = ro.input_ids.shape[0], ro.prompt_length
    lengths = torch.linspace(40, 500, N).long()[torch.randperm(N, generator=g)]   # (N,)
    C = int(lengths.max())
    ids = torch.randint(0, vocab, (N, C), generator=g)
    real = (torch.arange(C)[None] < lengths[:, None]).long()                     # (N, C)
    sampled = real.clone()
    for n in range(N):  # one observation block of 100 tokens per 200 completion tokens
        for start in range(60, int(lengths[n]) - 100, 200):
            sampled[n, start:start + 100] = 0
    return Rollout(input_ids=torch.cat([ro.input_ids[:, :P], ids], 1),
                   attention_mask=torch.cat([ro.attention_mask[:, :P], real], 1), completion_mask=sampled,
                   sample_logp=torch.zeros(N, C),
                   prompt_length=P, group_ids=ro.group_ids, num_calls=ro.num_calls, num_calls_no_obs=ro.num_calls_no_obs,
                   incomplete_calls=ro.incomplete_calls, tool_errors=ro.tool_errors,
                   num_generated=sampled.sum(1), truncated=ro.truncated, texts=ro.texts, queries=ro.queries)


def loss_pass_times(module, ro, impl, autocast, repeats):
    """Median seconds of the reference pass, the policy forward (+ loss), its backward, the optimizer step."""
    from grpo.losses import grpo_loss
    from models.loading import reference_policy

    hp = module.hparams
    params = [p for p in module.policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr)
    adv = torch.randn(ro.input_ids.shape[0])
    times = {"ref": [], "fwd": [], "bwd": [], "opt": []}
    for _ in range(repeats):
        with autocast():
            t0 = time.perf_counter()
            with torch.no_grad(), reference_policy(module.policy, module.ref_model) as ref:
                ref_logp = impl(ref, ro, hp.temperature)
            t1 = time.perf_counter()
            logp = impl(module.policy, ro, hp.temperature)
            out = grpo_loss(logp, None, ref_logp, adv, ro.completion_mask, hp.clip_eps, hp.clip_eps_high, hp.beta)
            t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        opt.step()
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt)
        del out, logp, ref_logp
    return {k: statistics.median(v) for k, v in times.items()}


def row(name, seconds, tokens=None, floor_tok_s=None, note=""):
    tok_s = f"{tokens / seconds:9.0f}" if tokens else " " * 9
    fl = f"{floor_tok_s:9.0f}" if floor_tok_s else " " * 9
    frac = f"{100 * tokens / seconds / floor_tok_s:5.1f}%" if tokens and floor_tok_s else " " * 6
    print(f"  {name:<34} {seconds:8.2f} s {tok_s} {fl} {frac}  {note}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/grpo_smollm2.yaml"))
    ap.add_argument("--synthetic", action="store_true", help="also time the loss passes on an SFT-shaped rollout")
    ap.add_argument("--repeats", type=int, default=3, help="loss passes per implementation (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed loss passes per implementation first")
    ap.add_argument("--skip-real", action="store_true", help="with --synthetic: time the loss passes on the synthetic rollout only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--impl", choices=("both", "fast", "padded"), default="both")
    ap.add_argument("--rollout-dtype", choices=("float32", "bfloat16"), default=None,
                    help="model.rollout_dtype (default: the config's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from data.datamodule import QADataModule
    from grpo.logprobs import completion_logprobs, completion_logprobs_padded
    from grpo.module import GRPOModule
    from models.loading import DTYPES

    cfg = yaml.safe_load(open(args.config))
    margs = dict(cfg["model"]["init_args"])
    adapter = margs.get("init_adapter")
    if adapter and not (ROOT / adapter).exists() and not Path(adapter).exists():
        print(f"note: no SFT adapter at {adapter}: a fresh LoRA on SmolLM2 (tags and tool calls are rare)")
        margs["init_adapter"] = None
    elif adapter and not Path(adapter).exists():
        margs["init_adapter"] = str(ROOT / adapter)
    if args.rollout_dtype:
        margs["rollout_dtype"] = args.rollout_dtype
    precision = cfg["trainer"].get("precision", "32-true")
    bf16 = "bf16" in str(precision)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
    if bf16 and not flags & {"amx_bf16", "avx512_bf16"}:
        print("note: this CPU has neither AMX nor AVX512_BF16: bf16 GEMMs are emulated (~30 GFLOP/s per thread, "
              "slower than fp32; benchmarks/matmul_dtype.py), so the 1,700 GFLOP/s bf16 floor is out of reach here")
    print(f"config {args.config}: precision {precision}, rollout_dtype {margs.get('rollout_dtype')}, "
          f"threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (2 cores)", flush=True)

    torch.manual_seed(0)
    dm = QADataModule(**{k: v for k, v in cfg["data"].items() if k != "class_path"})
    dm.setup("fit")
    module = GRPOModule(**margs)
    module.env = dm.search_env()
    module.configure_model()
    module.sampler.manual_seed(margs.get("seed", 0))
    batch = next(iter(dm.train_dataloader()))
    n_params = sum(p.numel() for p in module.policy.parameters() if not p.requires_grad)
    G = module.hparams.group_size

    # ---- rollout
    ro, rt = timed_rollout(module, batch, G)
    N, P = ro.input_ids.shape[0], ro.prompt_length
    B = N // G
    decode_s = sum(t for _, t in rt["decode"])
    decode_tok = sum(s[0] for s, _ in rt["decode"])  # rows fed per step (finished rows are still fed)
    obs_s, obs_tok = sum(t for _, t in rt["obs"]), sum(s[0] * s[1] for s, _ in rt["obs"])
    sampled_tokens = int(ro.completion_mask.sum())
    rows_per_step = decode_tok / max(1, len(rt["decode"]))
    decode_dtype = module.rollout_torch_dtype or DTYPES[module.hparams.dtype]  # what the rollout decoded in
    decode_peak = PEAK["bf16" if decode_dtype == torch.bfloat16 else "fp32"]
    decode_bytes = sum(p.numel() for p in module.policy.parameters()) * decode_dtype.itemsize
    step_floor = max(decode_bytes / MEM_BW, 2 * n_params * rows_per_step / decode_peak)
    prompt_tokens = int(ro.attention_mask[::G, :P].sum())
    print(f"B={B} G={G} N={N}: prompt {P} columns, completion {ro.completion_mask.shape[1]} columns, "
          f"{sampled_tokens} sampled + {int(ro.attention_mask[:, P:].sum()) - sampled_tokens} observation tokens, "
          f"{rt['calls']} tool calls, {int(ro.truncated.sum())} truncated; peak RSS {rss_mb():.0f} MB", flush=True)
    print(f"\n  {'piece':<34} {'time':>10} {'tok/s':>9} {'floor':>9} {'of it':>6}")
    row("rollout (total)", rt["total"], sampled_tokens, None, f"{len(rt['decode'])} decode steps")
    row("  prefill (B prompts)", rt["prefill"], prompt_tokens, decode_peak / (2 * n_params))
    row("  decode steps", decode_s, decode_tok, rows_per_step / step_floor, f"{rows_per_step:.1f} rows/step")
    row("  observation forwards", obs_s, obs_tok or None, decode_peak / (2 * n_params), f"{len(rt['obs'])} forwards")
    row("  tool (search env)", rt["tool"], None, None, f"{rt['calls']} calls")
    row("  sampling, tags, book-keeping", rt["total"] - rt["prefill"] - decode_s - obs_s - rt["tool"])
    t0 = time.perf_counter()
    module.compute_rewards(ro, batch)
    row("reward", time.perf_counter() - t0)
    print(f"  (peak RSS after rollout {rss_mb():.0f} MB)", flush=True)

    # ---- loss passes, both implementations
    peak = PEAK["bf16" if bf16 else "fp32"]
    impls = {"fast": completion_logprobs, "padded": completion_logprobs_padded}
    if args.impl != "both":
        impls = {args.impl: impls[args.impl]}
    rollouts = {} if args.synthetic and args.skip_real else {"this rollout": ro}
    if args.synthetic:
        rollouts["SFT-shaped (synthetic)"] = synthetic_rollout(ro, module.policy.config.vocab_size)
    results = {}
    for label, r in rollouts.items():
        useful = int(r.attention_mask[::G, :P].sum()) + int(r.attention_mask[:, P:].sum())  # each prompt once
        computed = r.input_ids.numel()
        print(f"\nloss passes on {label}: {useful} useful tokens (each prompt once, no padding), padded batch "
              f"{tuple(r.input_ids.shape)} = {computed} positions, {int(r.completion_mask.sum())} sampled", flush=True)
        for name, impl in impls.items():
            if args.warmup:
                loss_pass_times(module, r, impl, autocast, args.warmup)  # warm-up
            t = loss_pass_times(module, r, impl, autocast, args.repeats)
            results[(label, name)] = t
            print(f"  [{name}] peak RSS so far {rss_mb():.0f} MB")
            row(f"  reference pass ({name})", t["ref"], useful, peak / (2 * n_params))
            row(f"  policy forward + loss ({name})", t["fwd"], useful, peak / (2 * n_params))
            row(f"  policy backward ({name})", t["bwd"], useful, peak / (2 * n_params))
            row(f"  optimizer ({name})", t["opt"])
        if len(impls) == 2:
            f, p = results[(label, "fast")], results[(label, "padded")]
            for k in ("ref", "fwd", "bwd"):
                print(f"  speed-up {k}: {p[k] / f[k]:.2f}x", end="")
            tot_p, tot_f = p["ref"] + p["fwd"] + p["bwd"], f["ref"] + f["fwd"] + f["bwd"]
            print(f"\n  loss passes total: padded {tot_p:.2f} s -> fast {tot_f:.2f} s ({tot_p / tot_f:.2f}x)")
    print(f"\npeak RSS {rss_mb():.0f} MB; load average {os.getloadavg()[0]:.2f}")
