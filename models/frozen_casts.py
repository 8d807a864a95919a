"""Frozen linear weights cast once for the loss passes under autocast, not at every call.

Under `precision: bf16-mixed` the loss passes (π_ref, the policy's forward) run in an autocast region,
where `F.linear(x, W)` computes in bf16: it casts W at every call. Lightning's autocast keeps no cache
of the casts (`cache_enabled=False`), and autocast would only cache weights that need a gradient
anyway, so with LoRA every frozen base weight of SmolLM2 (~135M parameters, the LM head included) is
read in fp32 and written in bf16 again at every forward of a pass: the prompt's forward, each length
bucket's, each LM-head chunk's. Those weights do not change during a step (the rollout's LoRA merge
swaps them and gives them back before the loss passes), so casting each once for the step is the same
arithmetic: `F.linear` under autocast with a weight already in the autocast dtype leaves it as it is,
and computes what it computed with its own cast, bit for bit (tests/test_frozen_casts.py).

`frozen_casts(*models)` gives every `nn.Linear` whose weight is frozen (`requires_grad` False) and
fp32 a forward that uses the cast copy, for the body of a `with` block, when autocast is on for the
weights' device; otherwise it does nothing. Weights that train (the LoRA matrices; every weight under
full fine-tuning) keep autocast's own per-call cast, through which their gradient flows. A call made
with autocast off or in another dtype inside the block, or after the weight was changed (in place or
swapped), takes the module's own weight and autocast's cast. Memory: one copy of the frozen linear
weights in bf16 (~0.27 GB for SmolLM2) for the block; the casts autocast saved for the backward of
every forward are no longer made. On exit every module has its own forward back, also on error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import instance_forwards


class _CastForward:
    """y = x Wᵀ + b with W (and b) cast once to the autocast dtype. The plain path (the module's own weight,
    autocast's own cast) when autocast is off or in another dtype, or when the weight changed since."""

    def __init__(self, module: nn.Linear, weight: Tensor, bias: Tensor | None):
        self.module, self.weight, self.bias = module, weight, bias                      # (out, in), (out,)
        self.version = (module.weight._version, module.weight.data_ptr())

    def __call__(self, x: Tensor) -> Tensor:                                            # (..., in) -> (..., out)
        device, w = x.device.type, self.module.weight
        if (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != self.weight.dtype
                or (w._version, w.data_ptr()) != self.version):
            return F.linear(x, w, self.module.bias)
        return F.linear(x, self.weight, self.bias)


def _castable(module: nn.Module) -> bool:
    """A plain Linear whose weight (and bias) are frozen fp32: what autocast casts at every call."""
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module) is nn.Linear and w is not None and not w.requires_grad and w.dtype == torch.float32
            and (b is None or (not b.requires_grad and b.dtype == torch.float32)))


def frozen_casts(*models: nn.Module | None):
    """`models` whose frozen `nn.Linear` weights are cast once to the autocast dtype for the body of a `with`
    block (see the module docstring); nothing changes when autocast is off. None entries are skipped (no π_ref
    copy)."""
    copies = {}  # id(tensor) -> its cast, so a weight two modules share is cast once

    def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        if t is not None and id(t) not in copies:
            copies[id(t)] = t.detach().to(dtype)
        return None if t is None else copies[id(t)]

    def make(module: nn.Linear) -> _CastForward:
        dtype = torch.get_autocast_dtype(module.weight.device.type)
        return _CastForward(module, cast(module.weight, dtype), cast(module.bias, dtype))
    modules = (m for model in models if model is not None for m in model.modules()
               if _castable(m) and torch.is_autocast_enabled(m.weight.device.type))
    return instance_forwards(modules, make)
