"""Model plumbing, not the algorithm: `loading.py` (SmolLM2 from GGUF, any HF model or a tiny random
one, LoRA, 4-bit, the reference policy), `lora.py` (LoRA adapters as tensors: two stacked into one for
export), `tokenizer.py` (a byte tokenizer for tests)."""
