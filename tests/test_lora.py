"""`models.lora` as pure functions of tensors: two LoRA updates stacked into one, checked against the
sum of the two updates worked out directly; a module only one adapter adapts; bad input."""
import pytest
import torch

from models.lora import LoraDelta, check_lora_config, lora_rank, stack_lora

D_IN, D_OUT = 5, 3


def delta(r: int, scale: float, seed: int) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta(A=torch.randn(r, D_IN, generator=g), B=torch.randn(D_OUT, r, generator=g), scale=scale)


def test_stack_is_the_sum_of_the_updates():
    """s₁·B₁A₁ + s₂·B₂A₂ = [√s₁·B₁ | √s₂·B₂] · [√s₁·A₁ ; √s₂·A₂], rank r₁ + r₂, scale 1."""
    sft = {"q": delta(4, 2.0, 0), "v": delta(4, 2.0, 1)}      # r₁ = 4, α₁ = 8
    grpo = {"q": delta(2, 0.5, 2), "o": delta(2, 0.5, 3)}     # r₂ = 2, α₂ = 1
    stacked = stack_lora(sft, grpo)
    assert list(stacked) == ["q", "v", "o"]                    # the union, first adapter's order first
    for name, d in stacked.items():
        assert d.A.shape == (6, D_IN) and d.B.shape == (D_OUT, 6) and d.scale == 1.0
    torch.testing.assert_close(stacked["q"].delta(), sft["q"].delta() + grpo["q"].delta())
    torch.testing.assert_close(stacked["v"].delta(), sft["v"].delta())  # zeros in the GRPO block
    torch.testing.assert_close(stacked["o"].delta(), grpo["o"].delta())  # zeros in the SFT block
    assert not stacked["v"].A[4:].any() and not stacked["o"].B[:, :4].any()
    # by hand, rank 1 each: s₁·b₁a₁ᵀ + s₂·b₂a₂ᵀ with s₁ = 4, s₂ = 1/4
    one = LoraDelta(A=torch.tensor([[1.0, 0.0]]), B=torch.tensor([[1.0], [2.0]]), scale=4.0)
    two = LoraDelta(A=torch.tensor([[0.0, 2.0]]), B=torch.tensor([[4.0], [0.0]]), scale=0.25)
    torch.testing.assert_close(stack_lora({"m": one}, {"m": two})["m"].delta(), torch.tensor([[4.0, 2.0], [8.0, 0.0]]))


def test_stack_refuses_what_is_not_one_rank_or_shape():
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]"):
        stack_lora({"q": delta(4, 1.0, 0), "v": delta(2, 1.0, 1)}, {"q": delta(2, 1.0, 2)})
    wide = LoraDelta(A=torch.zeros(2, D_IN + 1), B=torch.zeros(D_OUT, 2), scale=1.0)
    with pytest.raises(ValueError, match="q: the adapters disagree on its shape"):
        stack_lora({"q": delta(4, 1.0, 0)}, {"q": wide})
    assert lora_rank({"q": delta(3, 1.0, 0)}, "x") == 3


def test_only_plain_lora_configs():
    check_lora_config({"peft_type": "LORA", "bias": "none", "use_dora": False, "modules_to_save": None}, "ok")
    with pytest.raises(ValueError, match="here: peft_type='PREFIX_TUNING'"):
        check_lora_config({"peft_type": "PREFIX_TUNING"}, "here")
    with pytest.raises(ValueError, match="modules_to_save=\\['lm_head'\\], bias='all'"):
        check_lora_config({"peft_type": "LORA", "modules_to_save": ["lm_head"], "bias": "all"}, "here")

# --------------------------------------------------------------------------------------- merged for decoding


def _tiny_lora(dtype: str = "float32", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj")):
    """The tiny Llama with LoRA r 4, its B made non-zero (a fresh B is 0: merging it would change nothing)."""
    from models.loading import add_lora, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny", dtype=dtype)
    policy = add_lora(model, r=4, alpha=8, target_modules=targets)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return policy.eval()


def _lora_calls(model) -> list[int]:
    """A list that counts every call of a LoRA A matrix from now on (forward hooks)."""
    calls = []
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _snapshot(model) -> dict[str, tuple[torch.Tensor, int]]:
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters(remove_duplicate=False)}


def _assert_bit_identical(model, before) -> None:
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == before.keys()
    for n, (value, ptr) in before.items():
        assert torch.equal(now[n], value) and now[n].data_ptr() == ptr, n


def test_merged_lora_is_the_adapter_model_and_restores_every_parameter_bit_identical():
    """Inside `merged_lora`: the same logits as the adapter model (fp32 rounding), no LoRA matmul runs and
    no peft LoRA layer is left; on exit (also when the body raises) every parameter is the same tensor
    with the same bits and every module is back. A merge without the scale s = α/r, or a restore by
    subtraction, fails."""
    from peft.tuners.lora import LoraLayer

    from models.lora import merged_lora

    policy = _tiny_lora()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = policy(input_ids=ids).logits                                          # (2, 12, V)
    before, modules = _snapshot(policy), [type(m) for m in policy.modules()]
    calls = _lora_calls(policy)
    with torch.no_grad(), merged_lora(policy) as merged:
        got = merged(input_ids=ids).logits
        assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not calls, "a LoRA matmul ran inside merged_lora"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _assert_bit_identical(policy, before)
    assert [type(m) for m in policy.modules()] == modules
    with pytest.raises(RuntimeError, match="in the middle"):
        with merged_lora(policy):
            raise RuntimeError("in the middle")
    _assert_bit_identical(policy, before)
    assert [type(m) for m in policy.modules()] == modules
    with torch.no_grad():
        policy(input_ids=ids)
    assert calls, "the adapters no longer run after merged_lora"


def test_merged_lora_merges_in_fp32_inside_an_autocast_region():
    """Lightning's bf16-mixed runs the whole training step, the rollout's merge included, under autocast,
    where a plain `addmm` would give W + s·BA in bf16: the update rounded onto bf16(W) (lost when it is
    below W's rounding step) and bf16 weights that an fp32 rollout cannot multiply with its fp32 inputs.
    Merged inside a bf16 autocast region, the weights are the fp32 ones merged outside it, bit for bit."""
    from models.lora import merged_lora

    policy = _tiny_lora()
    with torch.no_grad(), merged_lora(policy) as merged:
        want = {n: p.detach().clone() for n, p in merged.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), merged_lora(policy) as merged:
        got = dict(merged.named_parameters())
        assert got.keys() == want.keys()
        for n, p in got.items():
            assert p.dtype == torch.float32 and torch.equal(p, want[n]), n


def test_merged_lora_leaves_alone_what_it_cannot_merge_exactly():
    """Not merged, run as usual: a model without LoRA (full fine-tuning), bf16 weights (W + ΔW would be rounded to
    bf16), adapters disabled (π_ref), an adapted LM head whose weight is tied to the embeddings (the other
    adapted layers are merged)."""
    from peft.tuners.lora import LoraLayer

    from models.loading import load_model_and_tokenizer, reference_policy
    from models.lora import merged_lora

    def lora_layers(model):
        return sum(isinstance(m, LoraLayer) for m in model.modules())

    plain, _ = load_model_and_tokenizer("tiny")
    before = _snapshot(plain)
    with merged_lora(plain) as merged:
        assert merged is plain
        _assert_bit_identical(plain, before)
    bf16 = _tiny_lora("bfloat16")
    n = lora_layers(bf16)
    with merged_lora(bf16) as merged:
        assert lora_layers(merged) == n == 14
    policy = _tiny_lora()
    with reference_policy(policy) as ref, merged_lora(ref) as merged:
        assert lora_layers(merged) == 14
    with pytest.warns(UserWarning, match="tie_word_embeddings"):  # peft warns about an adapted tied layer
        tied = _tiny_lora(targets=("q_proj", "lm_head"))
    before = _snapshot(tied)
    with merged_lora(tied) as merged:
        assert [type(m.base_layer).__name__ for m in merged.modules() if isinstance(m, LoraLayer)] == ["Linear"]
        assert merged.get_base_model().lm_head.weight is merged.get_base_model().model.embed_tokens.weight
        assert not any(isinstance(m, LoraLayer) for m in merged.get_base_model().model.layers.modules())
    _assert_bit_identical(tied, before)


def test_merged_lora_leaves_4bit_layers_alone():
    """bitsandbytes 4-bit base layers are not merged (the sum would have to be requantized)."""
    pytest.importorskip("bitsandbytes")
    import tempfile
    import warnings

    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from models.loading import add_lora, tiny_model
    from models.lora import merged_lora

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(vocab_size=300).save_pretrained(d)
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    q = add_lora(q, r=4, alpha=8)
    n = sum(isinstance(m, LoraLayer) for m in q.modules())
    before = _snapshot(q)
    with merged_lora(q) as merged:
        assert sum(isinstance(m, LoraLayer) for m in merged.modules()) == n == 14
    _assert_bit_identical(q, before)


def test_cast_adapter_writes_the_same_adapter_in_bf16(tmp_path):
    """`python -m callbacks.export SRC DST`: every weight is SRC's rounded to bf16, the config is SRC's,
    and a folder that is not an adapter is refused by name."""
    from safetensors.torch import load_file, save_file

    from callbacks.export import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    weights = {"base_model.model.q.lora_A.weight": torch.tensor([[1.0 + 2 ** -10, -3.0]]),   # not a bf16 value
               "base_model.model.q.lora_B.weight": torch.tensor([[0.5], [2.0]])}
    save_file(weights, src / "adapter_model.safetensors")
    main([str(src), str(tmp_path / "dst")])
    out = load_file(tmp_path / "dst" / "adapter_model.safetensors")
    assert set(out) == set(weights) and all(v.dtype == torch.bfloat16 for v in out.values())
    assert out["base_model.model.q.lora_A.weight"].tolist() == [[1.0, -3.0]]                  # rounded to bf16
    assert out["base_model.model.q.lora_B.weight"].tolist() == [[0.5], [2.0]]
    assert (tmp_path / "dst" / "adapter_config.json").read_text() == '{"r": 4, "lora_alpha": 8}'
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_truncate_keeps_the_top_singular_directions_by_hand():
    """ΔW = s·BA with s = 2, B = [[1, 1], [0, 1]], A = [[1, 0], [0, 2]]: s·BA = [[2, 4], [0, 4]], whose
    singular values are √(18 ± √260) — and with B = diag(3, 1), A = I the SVD is plain: rank 1 keeps
    [[3, 0], [0, 0]], error 1/√10."""
    from models.lora import truncate_lora

    diag = LoraDelta(A=torch.eye(2), B=torch.tensor([[3.0, 0.0], [0.0, 1.0]]), scale=1.0)
    cut, err = truncate_lora({"m": diag}, 1)
    assert cut["m"].A.shape == (1, 2) and cut["m"].B.shape == (2, 1) and cut["m"].scale == 1.0
    torch.testing.assert_close(cut["m"].delta(), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert err["m"] == pytest.approx(1 / 10 ** 0.5)
    skew = LoraDelta(A=torch.tensor([[1.0, 0.0], [0.0, 2.0]]), B=torch.tensor([[1.0, 1.0], [0.0, 1.0]]), scale=2.0)
    s1, s2 = (18 + 260 ** 0.5) ** 0.5, (18 - 260 ** 0.5) ** 0.5          # σ of [[2, 4], [0, 4]]
    cut, err = truncate_lora({"m": skew}, 1)
    assert torch.linalg.matrix_norm(cut["m"].delta(), ord=2).item() == pytest.approx(s1, rel=1e-5)
    assert torch.linalg.matrix_norm(skew.delta() - cut["m"].delta()).item() == pytest.approx(s2, rel=1e-4)
    assert err["m"] == pytest.approx(s2 / (s1 ** 2 + s2 ** 2) ** 0.5, rel=1e-4)


def test_truncate_is_the_best_low_rank_approximation_and_keeps_low_ranks():
    """Rank 4 cut to 2 is the SVD's rank-2 approximation of ΔW itself (Eckart–Young); an update of
    rank ≤ K is kept as it is; a rank that is not a positive integer is refused by name."""
    from models.lora import truncate_lora

    d = delta(4, 0.5, 7)                                                   # D_OUT = 3 < 4: ΔW has rank 3
    U, S, Vh = torch.linalg.svd(d.delta())
    cut, err = truncate_lora({"q": d, "v": delta(2, 1.0, 8)}, 2)
    torch.testing.assert_close(cut["q"].delta(), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], rtol=1e-4, atol=1e-5)
    assert err["q"] == pytest.approx((S[2:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)
    assert cut["v"] is not None and err["v"] == 0.0
    torch.testing.assert_close(cut["v"].delta(), delta(2, 1.0, 8).delta())
    thin = LoraDelta(A=torch.randn(4, 2), B=torch.randn(D_OUT, 4), scale=1.0)   # d_in = 2: ΔW has rank 2 < k = 3
    cut, err = truncate_lora({"t": thin}, 3)
    assert cut["t"].A.shape == (3, 2) and cut["t"].B.shape == (D_OUT, 3) and err["t"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(cut["t"].delta(), thin.delta(), rtol=1e-4, atol=1e-5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"rank={bad!r}"):
            truncate_lora({"q": d}, bad)


def test_export_rank_writes_a_folder_that_reads_back_as_the_cut_update(tmp_path):
    """`python -m callbacks.export SRC DST --rank K` on a PEFT folder (α = 8, r = 4: s = 2): DST reads
    back (`read_adapter`) as `truncate_lora` of SRC's updates, rank K, in bf16; bad ranks and folders
    that are not one-rank LoRA are refused by name, nothing written."""
    import json

    from callbacks.export import main
    from models.lora import read_adapter, truncate_lora, write_adapter

    src, dst = tmp_path / "src", tmp_path / "dst"
    updates = {"model.layers.0.q": delta(4, 2.0, 0), "model.layers.0.v": delta(4, 2.0, 1)}
    write_adapter(updates, src, torch.float32)
    back, config = read_adapter(src)
    assert config["r"] == 4 and set(back) == set(updates)
    for name, d in updates.items():
        torch.testing.assert_close(back[name].delta(), d.delta())
    main([str(src), str(dst), "--rank", "2"])
    out, config = read_adapter(dst)
    assert config["r"] == 2 and all(d.A.dtype == torch.bfloat16 and d.A.shape[0] == 2 for d in out.values())
    expected, _ = truncate_lora(updates, 2)
    for name in updates:
        torch.testing.assert_close(out[name].delta(), expected[name].delta(), rtol=2e-2, atol=2e-2)
    for argv in ([str(src), str(tmp_path / "x"), "--rank", "0"], [str(tmp_path / "missing"), str(tmp_path / "x")]):
        with pytest.raises(SystemExit):
            main(argv)
    assert not (tmp_path / "x").exists()
    rs = json.loads((src / "adapter_config.json").read_text()) | {"use_rslora": True, "lora_alpha": 8}
    (src / "adapter_config.json").write_text(json.dumps(rs))                      # rsLoRA: s = α / √r = 8 / 2
    back, _ = read_adapter(src)
    assert back["model.layers.0.q"].scale == 4.0
    patterned = rs | {"rank_pattern": {"q": 8}}
    (src / "adapter_config.json").write_text(json.dumps(patterned))
    with pytest.raises(ValueError, match="rank_pattern"):
        read_adapter(src)
