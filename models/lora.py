"""LoRA adapters as plain tensors: read them off a PEFT model or folder, stack two into one, cut one to
a lower rank (`truncate_lora`), write one as a PEFT folder that `PeftModel.from_pretrained(base,
folder)` loads; merge them into the weights for decoding (`merged_lora`).

Why: GRPO from the SFT cold start merges the SFT adapter into the base weights and trains fresh
adapters on top (`models.loading.merge_adapter`, then `add_lora`), so each adapted Linear of the
trained policy is

    W' = W + s₁·B₁A₁ + s₂·B₂A₂        (1: SFT adapter, 2: GRPO adapter; s = lora_alpha / r)

and the GRPO adapter alone, applied to the raw base W, is not the policy. `stack_lora` writes the
sum as one LoRA of rank r₁ + r₂ at scale 1 (LoRA, Hu et al. 2021, eq. 3: ΔW = s·BA):

    s₁·B₁A₁ + s₂·B₂A₂ = [√s₁·B₁ | √s₂·B₂] · [√s₁·A₁ ; √s₂·A₂]

Only plain LoRA on Linear layers is such a low-rank update; anything else (another PEFT method,
DoRA, a trained bias, modules saved whole) is refused with the option named (`check_lora_config`).

Shapes: r rank, d_in / d_out the in / out features of the adapted Linear.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# options that make an adapter more than ΔW = s·BA on Linear layers, with their plain values
NOT_PLAIN_LORA = ("use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "trainable_token_indices",
                  "layer_replication", "target_parameters")


@dataclass(frozen=True)
class LoraDelta:
    """The LoRA update of one Linear: ΔW = scale · B @ A."""
    A: torch.Tensor   # (r, d_in)
    B: torch.Tensor   # (d_out, r)
    scale: float      # lora_alpha / r (lora_alpha / √r with rsLoRA)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.float() @ self.A.float())  # (d_out, d_in)


def check_lora_config(config: dict, where: str) -> None:
    """ValueError unless `config` (an adapter_config.json as a dict) is plain LoRA: ΔW = s·BA per Linear."""
    peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type={peft_type!r}; only LoRA adapters (peft_type 'LORA') can be "
                         "merged and exported as one adapter")
    bad = {k: config[k] for k in NOT_PLAIN_LORA if config.get(k)}
    if config.get("bias", "none") != "none":
        bad["bias"] = config["bias"]
    if bad:
        raise ValueError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())}; only plain LoRA "
                         "(a low-rank update ΔW = s·BA of Linear layers) can be merged and exported as one adapter")


def lora_deltas(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraDelta]:
    """{module name in the base model: its LoraDelta} of one adapter of a PEFT model, on the CPU."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in peft_model.get_base_model().named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if adapter_name in m.lora_embedding_A:
            raise ValueError(f"{name}: a LoRA adapter on an embedding; only Linear layers can be exported")
        if adapter_name in m.lora_A:
            out[name] = LoraDelta(A=m.lora_A[adapter_name].weight.detach().cpu(),   # (r, d_in)
                                  B=m.lora_B[adapter_name].weight.detach().cpu(),   # (d_out, r)
                                  scale=float(m.scaling[adapter_name]))
    return out


def lora_rank(deltas: dict[str, LoraDelta], which: str) -> int:
    """The one rank r of an adapter (ValueError if its modules differ, e.g. with a rank_pattern)."""
    ranks = {d.A.shape[0] for d in deltas.values()}
    if len(ranks) != 1:
        raise ValueError(f"{which} adapter has ranks {sorted(ranks)}: stacking it with another adapter into "
                         "one LoRA (stack_lora) needs a single rank (no rank_pattern)")
    return ranks.pop()


def _scaled_blocks(d: LoraDelta | None, r: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(√s·A, √s·B) in fp32, or zeros of rank r for a module the adapter does not adapt."""
    if d is None:
        return torch.zeros(r, d_in), torch.zeros(d_out, r)                        # (r, d_in), (d_out, r)
    root = math.sqrt(d.scale)
    return root * d.A.float(), root * d.B.float()                                 # (r, d_in), (d_out, r)


def stack_lora(first: dict[str, LoraDelta], second: dict[str, LoraDelta]) -> dict[str, LoraDelta]:
    """One LoRA whose update is the sum of two, rank r₁ + r₂, scale 1 (fp32):

        s₁·B₁A₁ + s₂·B₂A₂ = [√s₁·B₁ | √s₂·B₂] · [√s₁·A₁ ; √s₂·A₂]

    It adapts the union of the two adapters' modules; a module that only one of them adapts gets
    zeros in the other's block.
    """
    r1, r2 = lora_rank(first, "the first"), lora_rank(second, "the second")
    out = {}
    for name in [*first, *(n for n in second if n not in first)]:
        a, b = first.get(name), second.get(name)
        d_out, d_in = (a or b).B.shape[0], (a or b).A.shape[1]
        if a is not None and b is not None and (b.B.shape[0], b.A.shape[1]) != (d_out, d_in):
            raise ValueError(f"{name}: the adapters disagree on its shape: (d_out, d_in) = {(d_out, d_in)} "
                             f"vs {(b.B.shape[0], b.A.shape[1])}")
        (A1, B1), (A2, B2) = _scaled_blocks(a, r1, d_in, d_out), _scaled_blocks(b, r2, d_in, d_out)
        out[name] = LoraDelta(A=torch.cat([A1, A2], dim=0),                       # (r1 + r2, d_in)
                              B=torch.cat([B1, B2], dim=1),                       # (d_out, r1 + r2)
                              scale=1.0)
    return out


def check_adapter_folder(folder: Path) -> Path:
    """`folder` as a Path; FileNotFoundError naming it unless it holds adapter_config.json and the weights."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{str(folder)!r}: not a PEFT adapter folder (adapter_config.json + {ADAPTER_WEIGHTS})")
    return folder


def truncate_lora(deltas: dict[str, LoraDelta], rank: int) -> tuple[dict[str, LoraDelta], dict[str, float]]:
    """Each update cut to its best rank-`rank` approximation (Eckart–Young: the top singular values
    of ΔW = s·BA), scale 1, with the relative Frobenius error of each: √(Σ_{i>k} σᵢ²) / √(Σ σᵢ²).

    Stacked adapters grow by r per run (`stack_lora`); this shrinks one back, at a cost that the
    errors measure and an evaluation must confirm. The SVD is taken of an r × r core, never of ΔW:

        B = Q_B R_B,  Aᵀ = Q_A R_A  (reduced QR)  ⇒  ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ,  s·R_B R_Aᵀ = U Σ Vᵀ
        ΔW_k = (Q_B U_k √Σ_k) · (√Σ_k V_kᵀ Q_Aᵀ)  =  B' · A'

    An update whose rank r is already ≤ `rank` is kept as it is (error 0); when a side of ΔW is
    shorter than `rank` (m = min(d_out, d_in, r) < k) the factors are padded with zeros to rank k.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected a positive integer")
    out, errors = {}, {}
    for name, d in deltas.items():
        if d.A.shape[0] <= rank:
            out[name], errors[name] = d, 0.0
            continue
        QB, RB = torch.linalg.qr(d.B.float())                          # (d_out, r), (r, r) if r ≤ d_out
        QA, RA = torch.linalg.qr(d.A.float().T)                        # (d_in, r), (r, r) if r ≤ d_in
        U, S, Vh = torch.linalg.svd(d.scale * RB @ RA.T, full_matrices=False)  # S descending, m values
        root = S[:rank].sqrt()                                          # (k',) k' = min(k, m) ...
        A, B = root[:, None] * (Vh[:rank] @ QA.T), (QB @ U[:, :rank]) * root  # (k', d_in), (d_out, k')
        pad = rank - root.numel()                                       # ... zeros up to rank k when m < k
        out[name] = LoraDelta(A=torch.cat([A, A.new_zeros(pad, A.shape[1])]),        # (k, d_in)
                              B=torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1),  # (d_out, k)
                              scale=1.0)
        total = S.square().sum()
        errors[name] = float((S[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return out, errors


def read_adapter(folder: Path) -> tuple[dict[str, LoraDelta], dict]:
    """A PEFT LoRA folder as ({module name: LoraDelta}, its adapter_config.json); plain LoRA of one
    rank only (`check_lora_config`; a rank_pattern or alpha_pattern is refused by name)."""
    import json

    from safetensors.torch import load_file

    folder = check_adapter_folder(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    check_lora_config(config, str(folder))
    patterns = {k: config[k] for k in ("rank_pattern", "alpha_pattern") if config.get(k)}
    if patterns:
        raise ValueError(f"{str(folder)!r}: {', '.join(f'{k}={v!r}' for k, v in patterns.items())}; "
                         "only an adapter of one rank and one alpha can be read as LoraDeltas")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    state = load_file(folder / ADAPTER_WEIGHTS)
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    names = [k[len(prefix):-len(suffix)] for k in state if k.startswith(prefix) and k.endswith(suffix)]
    deltas = {n: LoraDelta(A=state[f"{prefix}{n}.lora_A.weight"], B=state[f"{prefix}{n}.lora_B.weight"], scale=scale)
              for n in names}
    if not deltas or len(state) != 2 * len(deltas):
        raise ValueError(f"{str(folder)!r}: {len(state)} tensors, expected a lora_A and a lora_B weight per module")
    return deltas, config


def write_adapter(deltas: dict[str, LoraDelta], folder: Path, dtype: torch.dtype,
                  base_model_name_or_path: str | None = None, lora_dropout: float = 0.0) -> None:
    """Write `deltas` as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    Written with lora_alpha = r, so that PEFT's scale α/r is 1: each delta's own scale is folded
    into its B (B ← s·B). target_modules are the full module names, so PEFT adapts exactly these.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    r = lora_rank(deltas, "the exported")
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=lora_dropout, target_modules=list(deltas),
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    state = {}
    for name, d in deltas.items():
        state[f"base_model.model.{name}.lora_A.weight"] = d.A.to(dtype).contiguous()            # (r, d_in)
        state[f"base_model.model.{name}.lora_B.weight"] = (d.scale * d.B).to(dtype).contiguous()  # (d_out, r)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def export_lora(policy: nn.Module, folder: Path) -> None:
    """Write the policy (a PEFT model) as one PEFT LoRA folder that is the policy on the raw base.

    With an init adapter merged into the base (`model.init_lora`, set by `models.loading.merge_adapter`)
    the folder holds `stack_lora(init adapter, policy's adapter)`, in the dtype of the policy's adapter
    weights (PEFT keeps adapters in fp32 on a bf16 base); without one, it is PEFT's own `save_pretrained`.
    Exact in fp32; on a bf16 base the policy's merged weights were rounded to bf16, which the folder
    cannot carry, so it matches the policy up to that rounding.
    """
    init = getattr(policy.get_base_model(), "init_lora", None)
    if init is None:
        policy.save_pretrained(folder)
        return
    config = policy.peft_config[policy.active_adapter]
    check_lora_config(config.to_dict(), "the policy's adapter")
    fresh = lora_deltas(policy, policy.active_adapter)
    dtype = next(iter(fresh.values())).A.dtype
    write_adapter(stack_lora(init, fresh), folder, dtype, config.base_model_name_or_path, config.lora_dropout)


def cast_adapter(source: Path, folder: Path, dtype: torch.dtype) -> None:
    """Write the PEFT LoRA folder `source` again into `folder` with its floating weights in `dtype`
    (the adapters under results/ are bf16: half the bytes; PEFT casts them to the base's dtype on load).
    The config is copied unchanged."""
    import shutil

    from safetensors.torch import load_file, save_file

    source, folder = check_adapter_folder(source), Path(folder)
    state = load_file(source / ADAPTER_WEIGHTS)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_config.json", folder / "adapter_config.json")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, folder / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})


# --------------------------------------------------------------------------- merged for decoding

def _mergeable(layer: nn.Module, uses: Counter) -> bool:
    """True for a peft LoRA Linear whose update can be merged exactly: plain LoRA (no variant such as
    DoRA, no bias, no active dropout), enabled and not merged by peft, on an fp32 `nn.Linear` whose
    weight no other module uses (`uses`: how many times each parameter appears in the model)."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return False
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.dtype != torch.float32 or uses[id(base.weight)] != 1:
        return False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    return all(a not in layer.lora_variant and layer.lora_B[a].bias is None
               and not (isinstance(layer.lora_dropout[a], nn.Dropout) and layer.lora_dropout[a].training
                        and layer.lora_dropout[a].p > 0)
               for a in active)


@contextlib.contextmanager
def merged_lora(model: nn.Module):
    """`model` with its LoRA updates merged into the weights they adapt, for decoding (no gradient):

        W ← W + Σ_a s_a·B_a A_a   (every active adapter a),   each peft LoRA Linear → its base nn.Linear

    so that a decode step makes one matmul per adapted Linear instead of three (base, A, B), without
    peft's Python wrapper around it. The merged model computes the same function up to fp32 rounding.
    On exit every module is put back and every W is the very tensor it was (kept aside, not restored
    by subtracting the update, which would drift in floating point over thousands of steps): every
    parameter is bit-identical to before, also when the body raises. Memory: one more copy of the
    adapted weights while inside (~0.4 GB for SmolLM2 in fp32).

    Layers left unmerged (they run as usual: still exact, only not faster), and why:
      * no LoRA at all (full fine-tuning): the weights are the policy, nothing to merge;
      * a base that is not a plain fp32 `nn.Linear`: 4-bit (bitsandbytes) weights would have to be
        requantized; bf16/fp16 weights would round W + ΔW, and an update smaller than the weight's
        rounding step (early in training, with a small lr) would be lost, not just rounded;
      * a LoRA variant (DoRA...), a LoRA bias, fan_in_fan_out, dropout that acts (training mode):
        not W + s·BA;
      * adapters disabled (`reference_policy`) or already merged by peft;
      * a weight another module shares (an adapted LM head tied to the embeddings).
    Under DDP each rank merges its own copy; nothing is synchronised.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    swapped = []  # (parent module, attribute, LoRA layer, original weight tensor)
    try:
        with torch.no_grad():
            for name, layer in list(model.named_modules()):
                if not name or not _mergeable(layer, uses):
                    continue
                parent, _, attr = name.rpartition(".")
                base = layer.base_layer
                W = merged = base.weight.data                                           # (d_out, d_in)
                with torch.autocast(W.device.type, enabled=False):  # fp32 even inside a bf16-mixed step
                    for a in (a for a in layer.active_adapters if a in layer.lora_A):  # W + s·B @ A, a new tensor
                        merged = torch.addmm(merged, layer.lora_B[a].weight, layer.lora_A[a].weight,
                                             alpha=layer.scaling[a])                   # (d_out, d_in)
                swapped.append((model.get_submodule(parent), attr, layer, W))
                base.weight.data = merged                                               # W is kept aside
                setattr(swapped[-1][0], attr, base)
        yield model
    finally:
        for parent, attr, layer, W in reversed(swapped):
            layer.base_layer.weight.data = W
            setattr(parent, attr, layer)
