"""Memory and time of GRPO's loss passes (step 4's π_ref, step 5's update) by micro-batch budget.

The update of `GRPOModule.policy_update` takes the batch in micro-batches of whole groups of at most
`loss_tokens_per_micro_batch` tokens (forward, backward, next micro-batch; one optimizer step); the
reference pass (no gradient) goes in the same micro-batches. A budget at least the batch's token count
is one micro-batch: exactly the computation of the code before micro-batches (one forward of the
whole batch kept for one backward). Peak RSS is a process's high-water mark, so each budget runs in a
process of its own, on one saved rollout:

    python benchmarks/loss_micro_batches.py --make-rollout /tmp/ro_b8.pt --batch-size 8 --adapter PATH
    python benchmarks/loss_micro_batches.py --rollout /tmp/ro_b8.pt --adapter PATH --tokens 1024 [--repeats 2]
    ... --groups 3 --tokens 0        # one group alone, in one pass: memory as a function of its tokens
    ... --truncate 12 --tokens 0     # completions cut to 12 positions: a batch whose one pass fits in memory
    ... --precision bf16             # the passes under bf16 autocast, as `trainer.precision: bf16-mixed`

The rollout is made by `AgentModule.rollout` (SmolLM2 + the SFT adapter merged + a fresh LoRA r 16,
configs/grpo_smollm2.yaml's sampling: G = 8, T = 1, 96 sampled tokens, tools on, offline task). For the
passes the fresh LoRA's B is set to N(0, 1e-3) (a trained adapter is not 0; the cost is the same).
Printed: the batch's tokens, the micro-batches, the high-water RSS before the passes, during the
reference pass and during the update (reset between them through /proc/self/clear_refs), and each
pass's median time. `--max-rss-gb` (default 4) ends the process when its RSS goes past it, so that a
budget too large for the machine cannot starve what else runs there.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def rss_gb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Hand freed memory back to the OS (glibc keeps it otherwise), then reset VmHWM to the current RSS."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def guard(limit_gb: float) -> None:
    """End the process (exit code 3) as soon as its RSS passes limit_gb."""
    def watch():
        while True:
            if rss_gb() > limit_gb:
                print(f"RSS {rss_gb():.2f} GB > --max-rss-gb {limit_gb}: stopped", flush=True)
                os._exit(3)
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


def build(args):
    from grpo.module import GRPOModule

    class Bench(GRPOModule):
        """policy_update without a trainer: plain backward, AdamW step (the module's own loop)."""

        def accumulate_grad(self, loss, sync=True):
            loss.backward()

        def step_optimizer(self):
            torch.nn.utils.clip_grad_norm_(self.params, self.hparams.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)  # the fresh LoRA's A (peft draws it from the global RNG)
    m = Bench(model_name="smollm2-135m-instruct", init_adapter=args.adapter, group_size=8, beta=0.04,
              max_new_tokens=96, temperature=1.0, loss_tokens_per_micro_batch=args.tokens or 10**9)
    m.configure_model()
    m.params = [p for p in m.policy.parameters() if p.requires_grad]
    m.opt = torch.optim.AdamW(m.params, lr=2e-5)
    return m


def make_rollout(args) -> None:
    from data.datamodule import QADataModule

    dm = QADataModule(task="offline", batch_size=args.batch_size)
    dm.setup("fit")
    m = build(args)
    m.env = dm.search_env()
    m.sampler.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    t0 = time.perf_counter()
    ro = m.rollout(batch, temperature=1.0, group_size=8)
    print(f"rollout B={len(batch)} G=8: {time.perf_counter() - t0:.1f} s, {int(ro.completion_mask.sum())} sampled "
          f"+ {int(ro.attention_mask[:, ro.prompt_length:].sum() - ro.completion_mask.sum())} observation tokens, "
          f"{int(ro.num_calls.sum())} calls", flush=True)
    torch.save(ro, args.make_rollout)


def passes(args) -> None:
    from grpo.logprobs import loss_micro_batches

    m = build(args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3, generator=g)
    ro = torch.load(args.rollout, weights_only=False)
    if args.groups:  # only these groups of the saved rollout
        ro = ro.select(torch.cat([torch.arange(8 * g, 8 * g + 8) for g in map(int, args.groups.split(","))]))
    if args.truncate:  # every completion cut to its first K positions (a prefix of what was sampled)
        K, P = args.truncate, ro.prompt_length
        ro.input_ids, ro.attention_mask = ro.input_ids[:, :P + K], ro.attention_mask[:, :P + K]
        ro.completion_mask, ro.sample_logp = ro.completion_mask[:, :K], ro.sample_logp[:, :K]
    N, P = ro.input_ids.shape[0], ro.prompt_length
    micro = loss_micro_batches(ro, m.hparams.loss_tokens_per_micro_batch)
    tokens = int(ro.attention_mask[::8, :P].sum() + ro.attention_mask[:, P:].sum())
    advantages = torch.randn(N, generator=torch.Generator().manual_seed(1))
    print(f"B={N // 8} G=8: {tokens} tokens (prompts once), {int(ro.completion_mask.sum())} sampled, C "
          f"{ro.completion_mask.shape[1]}; budget {args.tokens or 'one pass'}: {len(micro)} micro-batches of "
          f"{[len(r) for r in micro]} rows; threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    base = rss_gb()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")  # as bf16-mixed
    times = {"ref": [], "update": []}
    peaks = {"ref": 0.0, "update": 0.0}
    for _ in range(args.repeats):
        reset_peak()
        t0 = time.perf_counter()
        with autocast:
            ref_logp = m.reference_logprobs(ro, micro)
        times["ref"].append(time.perf_counter() - t0)
        peaks["ref"] = max(peaks["ref"], rss_gb("VmHWM"))
        reset_peak()
        t0 = time.perf_counter()
        with autocast:
            out = m.policy_update(ro, micro, ro.sample_logp, ref_logp, advantages, torch.ones(()))
        times["update"].append(time.perf_counter() - t0)
        peaks["update"] = max(peaks["update"], rss_gb("VmHWM"))
        print(f"  ref {times['ref'][-1]:.1f} s (peak {peaks['ref']:.2f} GB)  update {times['update'][-1]:.1f} s "
              f"(peak {peaks['update']:.2f} GB)  loss {float(out.loss):.6f} kl {float(out.kl):.3e}", flush=True)
    print(f"RESULT precision={args.precision} tokens_per_micro_batch={args.tokens or 'one pass'} micro_batches={len(micro)} "
          f"rss_before={base:.2f}GB ref_peak={peaks['ref']:.2f}GB update_peak={peaks['update']:.2f}GB "
          f"ref_s={statistics.median(times['ref']):.1f} update_s={statistics.median(times['update']):.1f} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="the SFT cold-start adapter (PEFT folder)")
    ap.add_argument("--make-rollout", help="sample a rollout and save it here")
    ap.add_argument("--batch-size", type=int, default=8, help="B questions of the rollout made")
    ap.add_argument("--rollout", help="a rollout saved by --make-rollout")
    ap.add_argument("--tokens", type=int, default=0, help="loss_tokens_per_micro_batch (0: one pass, as before)")
    ap.add_argument("--groups", help="only these groups of the rollout, e.g. 0,3")
    ap.add_argument("--truncate", type=int, default=0, help="cut every completion to its first K positions")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16: the passes under bf16 autocast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rss-gb", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    guard(args.max_rss_gb)
    make_rollout(args) if args.make_rollout else passes(args)
