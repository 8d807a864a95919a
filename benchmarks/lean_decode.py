"""Is a hand-written decode step worth its code? SmolLM2's decode step through transformers' forward
against a lean Llama step written here with the same weights.

The lean step: q/k/v fused into one matmul and gate/up into another, a preallocated KV cache written
in place, grouped-query attention as two small matmuls, the LM head on the one new position. Both
read the same cache of W tokens for R rows and add one token per row per step; the rollout's decode
step is this forward plus sampling. Row 0's first cached position is masked in both (a hole, as left
padding makes one): without any hole transformers gives SDPA no mask, and that mask-free call is
slower in bf16 on CPU (benchmarks/PERF.md; the rollout always passes the mask, `models.attention`).
The first step of each is compared (logits) before timing: the lean step must compute the same
function (fp32: |Δ logit| ~1e-5; bf16: within bf16 rounding).

    python benchmarks/lean_decode.py [--dtype bf16] [--rows 8] [--cached 150] [--steps 24] [--rounds 3]

Prints each round's median ms per step for both, alternating, then the ratio of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from grpo.kvcache import GrowingLayer  # noqa: E402
from models.loading import load_model_and_tokenizer  # noqa: E402


class LeanLlama:
    """One-token decode steps of a transformers Llama model, in plain tensor ops (no autograd)."""

    def __init__(self, model, cache, rows: int, cached: int, spare: int):
        c, layers = model.config, model.model.layers
        self.H, self.KV, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps, self.I = c.rms_norm_eps, c.intermediate_size
        theta = c.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.D, 2).float() / self.D)             # (D/2,)
        a = [l.self_attn for l in layers]
        self.qkv = [torch.cat([x.q_proj.weight, x.k_proj.weight, x.v_proj.weight]) for x in a]  # (H+2KV)D × d
        self.o = [x.o_proj.weight for x in a]
        self.gu = [torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]) for l in layers]   # 2I × d
        self.down = [l.mlp.down_proj.weight for l in layers]
        self.n1 = [l.input_layernorm.weight for l in layers]
        self.n2 = [l.post_attention_layernorm.weight for l in layers]
        self.emb, self.norm, self.head = model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight
        dtype = self.emb.dtype
        self.K = [torch.zeros(rows, self.KV, cached + spare, self.D, dtype=dtype) for _ in layers]
        self.V = [torch.zeros_like(k) for k in self.K]
        for K, V, layer in zip(self.K, self.V, cache.layers):
            K[:, :, :cached], V[:, :, :cached] = layer.keys, layer.values

    def _rms(self, x, w):  # fp32 statistics, as LlamaRMSNorm
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rope(self, x, cos, sin):
        half = self.D // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def step(self, tokens, n: int, keep):
        """tokens (R,) at position n (n tokens cached before them), keep (R, n+1) bool (False: a
        masked hole, e.g. left padding): next-token logits (R, V)."""
        R, H, KV, D = len(tokens), self.H, self.KV, self.D
        x = self.emb[tokens]                                                          # (R, d)
        angles = torch.cat([n * self.inv_freq] * 2)                                   # (D,)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i in range(len(self.qkv)):
            qkv = self._rms(x, self.n1[i]) @ self.qkv[i].T                            # (R, (H+2KV)D)
            q = self._rope(qkv[:, :H * D].view(R, KV, H // KV, D), cos, sin)          # (R, KV, H/KV, D)
            k = self._rope(qkv[:, H * D:(H + KV) * D].view(R, KV, D), cos, sin)       # (R, KV, D)
            self.K[i][:, :, n], self.V[i][:, :, n] = k, qkv[:, (H + KV) * D:].view(R, KV, D)
            keys, values = self.K[i][:, :, :n + 1], self.V[i][:, :, :n + 1]           # (R, KV, n+1, D)
            scores = (q @ keys.transpose(-1, -2)).float() * D ** -0.5                 # (R, KV, H/KV, n+1)
            scores = scores.masked_fill(~keep[:, None, None], torch.finfo(torch.float32).min)
            attn = (scores.softmax(-1).to(x.dtype) @ values).reshape(R, H * D)        # (R, H·D)
            x = x + attn @ self.o[i].T
            gate, up = (self._rms(x, self.n2[i]) @ self.gu[i].T).split(self.I, -1)    # (R, I) each
            x = x + (F.silu(gate) * up) @ self.down[i].T
        return self._rms(x, self.norm) @ self.head.T                                  # (R, V)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--cached", type=int, default=150, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps per round and variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, _ = load_model_and_tokenizer(dtype="float32")
    model = model.to(dtype).eval()
    R, W = args.rows, args.cached
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 40000, (R,), generator=gen)
    spare = 1 + args.rounds * args.steps
    with torch.no_grad():
        cache = model(input_ids=torch.randint(100, 40000, (R, W), generator=gen), use_cache=True,
                      logits_to_keep=1).cache
        cache.layers = [GrowingLayer.of(layer) for layer in cache.layers]
        lean = LeanLlama(model, cache, R, W, spare)

        def keep(n):  # every row attends to all its n + 1 positions but row 0's first (a left-padded row)
            mask = torch.ones(R, n + 1, dtype=torch.bool)
            mask[0, 0] = False
            return mask

        def hf(n):
            return model(input_ids=tokens[:, None], position_ids=torch.full((R, 1), n),
                         attention_mask=keep(n).long(), cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        a, b = hf(W).float(), lean.step(tokens, W, keep(W)).float()
        print(f"SmolLM2 {args.dtype}, {R} rows, {W} cached, {args.threads} threads; first step: "
              f"max |Δ logit| {(a - b).abs().max().item():.2e}, argmax agree {(a.argmax(-1) == b.argmax(-1)).sum()}/{R}")
        n, ratios = W + 1, []
        for r in range(args.rounds):
            ms = {}
            for name in ("hf", "lean"):
                times = []
                for s in range(args.steps):
                    t = time.perf_counter()
                    hf(n + s) if name == "hf" else lean.step(tokens, n + s, keep(n + s))
                    times.append(1000 * (time.perf_counter() - t))
                ms[name] = statistics.median(times)
            n += args.steps  # both variants filled the same positions; the next round moves on
            ratios.append(ms["hf"] / ms["lean"])
            print(f"round {r}: transformers {ms['hf']:.1f} ms, lean {ms['lean']:.1f} ms per step: {ratios[-1]:.2f}x")
    print(f"lean_speedup: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
