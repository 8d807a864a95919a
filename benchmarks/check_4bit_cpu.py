"""Does a LoRA backward through bitsandbytes 4-bit layers give the right gradients on CPU?

Builds a tiny Llama, loads it once in 4-bit (NF4) and once in fp32 with the *dequantized*
4-bit weights (so both compute the same function), adds identical LoRA adapters, and compares
the LoRA gradients of one loss. Prints the relative error; `models.loading.check_4bit` refuses
4-bit on CPU because of what this prints.

    python benchmarks/check_4bit_cpu.py
"""
import tempfile
import warnings

import torch

from models.loading import add_lora, tiny_model


def lora_grads(model, ids):
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # same non-zero LoRA init in both models
        if "lora_" in n:
            p.data = torch.randn_like(p, dtype=torch.float32).mul_(0.05).to(p.dtype)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_model(vocab_size=300, hidden_size=128)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
            ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            # give the fp32 model the dequantized 4-bit weights: both compute the same function
            for (name, mod) in q.named_modules():
                if isinstance(mod, bnb.nn.Linear4bit):
                    w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
                    ref.get_submodule(name).weight.data.copy_(w)
            q, ref = add_lora(q, r=4, alpha=8), add_lora(ref, r=4, alpha=8)
            loss_q, g_q = lora_grads(q, ids)
            loss_r, g_r = lora_grads(ref, ids)
    print(f"loss 4-bit {loss_q:.6f}  fp32(dequantized) {loss_r:.6f}")
    worst = 0.0
    for n in g_r:
        if n not in g_q:
            print(f"missing gradient in 4-bit model: {n}")
            worst = float("inf")
            continue
        rel = ((g_q[n] - g_r[n]).norm() / g_r[n].norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    print(f"LoRA gradients: {len(g_q)} (4-bit) vs {len(g_r)} (fp32); worst relative error {worst:.2e}")
    # yardstick: the same fp32 model under bf16 autocast, the precision we accept on CPU anyway
    ref.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, g_b = lora_grads(ref, ids)
    bf16 = max(((g_b[n] - g_r[n]).norm() / g_r[n].norm().clamp_min(1e-12)).item() for n in g_r)
    print(f"yardstick, bf16 autocast vs fp32: worst relative error {bf16:.2e}")
    for w in {str(c.message)[:160] for c in caught}:
        print("warning:", w)
    print("verdict:", "4-bit gradients match fp32 within bf16 precision" if worst <= bf16
          else "4-bit gradients DO NOT match fp32 within bf16 precision")


if __name__ == "__main__":
    main()
