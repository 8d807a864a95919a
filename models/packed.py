"""The rollout's linear layers on CPU with their weights packed for oneDNN once, not at every call.

On CPU, ATen computes a bf16 `F.linear` with oneDNN, handing it the weight in its plain (out, in)
layout; oneDNN then reorders the weight into its blocked layout inside every call. At decode shapes
(a few rows) that reorder is a large share of the call: SmolLM2's MLP weight (1536 x 576) at 8 rows,
1 thread, 130 µs plain against 87 µs packed; the LM head (49,152 x 576) 9.0 ms against 5.2 ms; at
256 rows the two are equal (`benchmarks/packed_linear.py`). An fp32 `F.linear` goes to MKL's GEMM,
which at a few rows is slower still than oneDNN with a packed weight (LM head at 8 rows: 20.6 against
9.3 ms), but not at one row (MKL is as fast there: fp32 weights are packed from 4 rows on). Packing
every weight of SmolLM2 costs ~0.2 s (1 thread), what ~23 (bf16) or ~11 (fp32) decode steps at 8 rows
save; a rollout makes 64-200.

`packed_linears(model)` packs the weight of every bf16 or fp32 `nn.Linear` of a CPU model
(`torch.ops.mkldnn._reorder_linear_weight`) and gives the module a forward that calls oneDNN with
the packed weight (`torch.ops.mkldnn._linear_pointwise`). In bf16 that is the library and kernel of
the plain call: the same numbers bit for bit. In fp32 it is another GEMM than MKL's: the same up to
fp32 rounding (SmolLM2's sampler/learner gap, `benchmarks/sampler_gap.py`: mean |Δ log p| 1.3e-6 →
1.7e-6, where bf16-mixed has 6e-3). For decoding only: the packed weight is a copy without gradient,
the module's own weight is not touched, and an input that needs a gradient or has another dtype takes
the plain path. On exit every module has its own forward back, also on error. Left as they are:
other dtypes, models off the CPU, PyTorch builds without oneDNN, and a dtype this CPU's oneDNN cannot
pack (`packs`: bf16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU oneDNN refuses it, and
there a plain bf16 matmul is ~8x slower than fp32 anyway: keep `32-true` and no `rollout_dtype` there).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import instance_forwards

ROWS_HINT = 8  # rows per call oneDNN picks the packed layout for (a decode step of one group)
DTYPES = (torch.bfloat16, torch.float32)
FP32_MIN_ROWS = 4  # fewer rows: MKL's fp32 GEMM is as fast as a packed call, packing would not pay


def available() -> bool:
    """oneDNN's packed-linear ops are in this PyTorch build."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") \
        and hasattr(ops, "_linear_pointwise")


def _reorder(weight: Tensor, rows_hint: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)                   # (out, in), oneDNN layout


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """This CPU's oneDNN packs weights of `dtype` (asked once, with an 8 x 8 weight: the op raises where the
    CPU lacks the instructions it needs, e.g. bf16 on an AVX2-only CPU)."""
    if not available():
        return False
    try:
        _reorder(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def _packable(module: nn.Module, rows: int) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is nn.Linear and w is not None and w.dtype in DTYPES and w.device.type == "cpu"
            and (w.dtype != torch.float32 or rows >= FP32_MIN_ROWS) and packs(w.dtype))


class _PackedForward:
    """y = x Wᵀ + b with W packed for oneDNN; an input of another dtype takes the plain path."""

    def __init__(self, module: nn.Linear, rows_hint: int):
        self.weight, self.bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        self.packed = _reorder(self.weight, rows_hint)                                  # (out, in), oneDNN layout

    def __call__(self, x: Tensor) -> Tensor:                                            # (..., in) -> (..., out)
        if x.dtype != self.weight.dtype or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packed_linears(model: nn.Module, rows: int = ROWS_HINT):
    """`model` whose bf16/fp32 CPU `nn.Linear`s call oneDNN with a weight packed once, for the body of a `with`
    block (module docstring). `rows`: how many rows the caller decodes at a time; fp32 weights are packed from
    FP32_MIN_ROWS rows on; a dtype this CPU cannot pack (`packs`) is left to the plain call."""
    modules = (m for m in model.modules() if _packable(m, rows)) if available() else ()
    return instance_forwards(modules, lambda m: _PackedForward(m, min(rows, ROWS_HINT)))
