"""Time loading SmolLM2-135M-Instruct: the first load converts the GGUF file (~15 s), later
loads read the cached HF folder (target: under 2 s).

    python benchmarks/model_load.py
"""
import time

from models.loading import SMOLLM2, cache_dir, load_model_and_tokenizer, smollm2_path

if __name__ == "__main__":
    cached = (cache_dir() / SMOLLM2 / "model.safetensors").exists()
    t0 = time.perf_counter()
    smollm2_path()
    print(f"cache ready ({'was there' if cached else 'converted from GGUF'}): {time.perf_counter() - t0:.2f} s")
    for i in range(2):
        t0 = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(SMOLLM2)
        print(f"load {i + 1} from cache: {time.perf_counter() - t0:.2f} s "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
