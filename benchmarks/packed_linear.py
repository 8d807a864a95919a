"""`F.linear` with the weight in its plain layout (bf16: oneDNN reorders it inside every call; fp32: MKL's
GEMM) against oneDNN with the weight packed once (`models.packed`), at SmolLM2's shapes and the row
counts of decoding; and what packing every weight of SmolLM2 costs, once per rollout.

    python benchmarks/packed_linear.py [--threads 1] [--dtype fp32]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.packed import ROWS_HINT, available  # noqa: E402

SHAPES = {"q/o": (576, 576, 60), "k/v": (192, 576, 60), "gate/up": (1536, 576, 60), "down": (576, 1536, 30),
          "lm_head": (49152, 576, 1)}  # (out, in, how many SmolLM2 has)


def seconds(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 16, 64, 256])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    if not available():
        sys.exit("this PyTorch build has no oneDNN packed-linear ops")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"threads {torch.get_num_threads()}, {args.dtype}, weights packed for {ROWS_HINT} rows")
    print(f"{'M':>5} {'shape':>8} {'plain us':>9} {'packed us':>10} {'speed-up':>9} {'max |diff|':>10}")
    saved = {}  # M -> µs saved per forward of the whole model (every linear once)
    for M in args.rows:
        for name, (n, k, count) in SHAPES.items():
            W, x = (torch.randn(n, k) / k ** 0.5).to(dtype), torch.randn(M, k).to(dtype)   # outputs ~ N(0, 1)
            P = torch.ops.mkldnn._reorder_linear_weight(W, ROWS_HINT)
            reps = max(3, (20 if name == "lm_head" else 4000) // M)
            plain = seconds(lambda: F.linear(x, W), reps)
            fast = seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, P, None, "none", [], ""), reps)
            diff = (F.linear(x, W) - torch.ops.mkldnn._linear_pointwise(x, P, None, "none", [], "")).abs().max()
            saved[M] = saved.get(M, 0.0) + count * (plain - fast)
            print(f"{M:5d} {name:>8} {plain * 1e6:9.0f} {fast * 1e6:10.0f} {plain / fast:9.2f} {float(diff):10.1e}",
                  flush=True)
    pack = 0.0
    for name, (n, k, count) in SHAPES.items():
        Ws = [torch.randn(n, k).to(dtype) for _ in range(4)]  # fresh weights: nothing cached
        torch.ops.mkldnn._reorder_linear_weight(Ws.pop(), ROWS_HINT)   # the shape's first reorder (oneDNN JIT)
        t0 = time.perf_counter()
        for w in Ws:
            torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT)
        pack += count * (time.perf_counter() - t0) / len(Ws)
    print(f"packing all of SmolLM2's linear weights: {pack * 1e3:.0f} ms (once per rollout)")
    for M, s in saved.items():
        print(f"saved per forward at {M} rows: {s * 1e3:.1f} ms -> packing pays after {pack / s:.1f} forwards"
              if s > 0 else f"saved per forward at {M} rows: {s * 1e3:.1f} ms (packing does not pay)")
