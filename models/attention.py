"""The attention the rollout's forwards run: transformers' own SDPA attention, always given a mask.

transformers leaves the attention mask out when it has no hole (every row attends to every cached
position: one prompt, or prompts of one length, and no row that waited) and lets SDPA run without
one. On CPU with bf16 weights that mask-free call is the slower one: SmolLM2, 8 rows x 200 cached
tokens, 2 threads, a decode step took 67-80 ms without a mask and 48-60 ms with one (the same
step, one masked position added; fp32: no difference; benchmarks/PERF.md, "… attention at decode
shapes"). So the rollout builds the mask always: the same function, the same kernel inputs plus a
mask of ones where transformers would have dropped it.

`masked_sdpa(model)` switches a transformers model (or any wrapper that shares its `config`) to it
for the body of a `with` block, and back after, also on error. Left as they are: models that do not
run transformers' SDPA attention (`_attn_implementation` other than "sdpa"), and models off the CPU
(measured on CPU only; on a GPU an explicit mask would rule out SDPA's flash backend).
"""
from __future__ import annotations

import contextlib

from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_always_masked"


def _always_mask(*args, **kwargs):
    """transformers' boolean SDPA mask (causal and padding), built even when it has no hole."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, sdpa_attention_forward)
AttentionMaskInterface.register(NAME, _always_mask)


@contextlib.contextmanager
def masked_sdpa(model: nn.Module):
    """`model` running `sdpa_attention_forward` with an explicit mask at every forward inside the block."""
    config = getattr(model, "config", None)
    weight = next(model.parameters(), None)
    switch = getattr(config, "_attn_implementation", None) == "sdpa" and weight is not None and weight.is_cpu
    if switch:
        config._attn_implementation = NAME  # transformers reads it at every forward (attention and mask)
    try:
        yield model
    finally:
        if switch:
            config._attn_implementation = "sdpa"
