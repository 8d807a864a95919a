"""fp32 against bf16 `F.linear` at SmolLM2's shapes, for the row counts of decoding (M = 1..16) and
of the loss pass (M = 1024), and which instruction set oneDNN runs bf16 on.

bf16 is only fast where the CPU computes in bf16 (AMX, or AVX512_BF16); without either, oneDNN's
bf16 GEMM converts to fp32 in registers and is slower than MKL's fp32 GEMM.

    python benchmarks/matmul_dtype.py [--threads 1]
"""
import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "lm_head": (49152, 576), "lora_A": (16, 576), "lora_B": (576, 16)}  # (out, in)


def cpu_flags() -> set[str]:
    try:
        return set(open("/proc/cpuinfo").read().split()) & {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f",
                                                            "avx512_vnni"}
    except OSError:
        return set()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"cpu flags {sorted(cpu_flags())}")
    print(f"{'M':>5} {'shape':>8} {'fp32 us':>9} {'bf16 us':>9} {'fp32 GF/s':>10} {'bf16 GF/s':>10} {'bf16/fp32':>9}")
    for M in (1, 8, 16, 1024):
        for name, (n, k) in SHAPES.items():
            t = {}
            for dt in (torch.float32, torch.bfloat16):
                W, x = torch.randn(n, k).to(dt), torch.randn(M, k).to(dt)
                for _ in range(3):
                    F.linear(x, W)
                reps = max(3, 2000 // M)
                t0 = time.perf_counter()
                for _ in range(reps):
                    F.linear(x, W)
                t[dt] = (time.perf_counter() - t0) / reps
            fl = 2 * M * n * k
            print(f"{M:5d} {name:>8} {t[torch.float32] * 1e6:9.0f} {t[torch.bfloat16] * 1e6:9.0f} "
                  f"{fl / t[torch.float32] / 1e9:10.1f} {fl / t[torch.bfloat16] / 1e9:10.1f} "
                  f"{t[torch.bfloat16] / t[torch.float32]:9.2f}", flush=True)
