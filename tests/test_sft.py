"""Cold start: trace tokenization masks prompt and observations; the tiny SFT run trains."""
from __future__ import annotations

import math

import pytest
import torch

from data.traces import Trace
from envs.protocol import SYSTEM_PROMPT, chatml
from grpo.sft import IGNORE, collate_sft, sft_loss, tokenize_trace
from models.tokenizer import ByteTokenizer


def _trace():
    return Trace(id="t1", question="Q?", answers=("Nairobi",), kind="lookup", style="search",
                 segments=(("model", "<call>Kenya</call>"), ("obs", "[Kenya] Its capital is Nairobi."),
                           ("model", "<answer>Nairobi</answer>")))


def test_labels_cover_only_the_models_own_tokens():
    """Hand-built: prompt and `<obs>…</obs>` get IGNORE; the model's segments and EOS are supervised."""
    tok = ByteTokenizer()
    ids, labels = tokenize_trace(tok, _trace())
    prompt = tok.encode(chatml(SYSTEM_PROMPT, "Q?"))
    call = tok.encode("<call>Kenya</call>")
    obs = tok.encode("<obs>") + tok.encode("[Kenya] Its capital is Nairobi.") + tok.encode("</obs>")
    answer = tok.encode("<answer>Nairobi</answer>")
    assert ids == prompt + call + obs + answer + [tok.eos_token_id]
    expected = [IGNORE] * len(prompt) + call + [IGNORE] * len(obs) + answer + [tok.eos_token_id]
    assert labels == expected
    supervised = tok.decode([t for t in labels if t != IGNORE])
    assert supervised == "<call>Kenya</call><answer>Nairobi</answer><|im_end|>"


def test_observation_is_cut_like_the_rollout_cuts_it():
    tok = ByteTokenizer()
    ids, labels = tokenize_trace(tok, _trace(), max_obs_tokens=5)
    text = tok.decode(ids)
    assert "<obs>[Keny</obs>" in text


def test_loss_ignores_prompt_and_observation_positions():
    """Changing the logits that predict masked tokens leaves the loss unchanged."""
    tok = ByteTokenizer()
    batch = collate_sft([tokenize_trace(tok, _trace())], tok.pad_token_id)
    V = len(tok)
    logits = torch.randn(1, batch["input_ids"].shape[1], V, generator=torch.Generator().manual_seed(0))
    base = sft_loss(logits, batch["labels"])
    predicts_masked = batch["labels"][0, 1:] == IGNORE          # row t predicts label t+1
    noisy = logits.clone()
    noisy[0, :-1][predicts_masked] += 100 * torch.randn(int(predicts_masked.sum()), V)
    assert torch.allclose(sft_loss(noisy, batch["labels"]), base)
    noisy[0, :-1][~predicts_masked] += 1.0 * torch.randn(int((~predicts_masked).sum()), V)
    assert not torch.allclose(sft_loss(noisy, batch["labels"]), base)


def test_loss_is_the_mean_over_supervised_tokens_by_hand():
    """Divided by the supervised tokens only, so padding (a long trace in the batch) does not shrink it.
    V = 4, logits 0: cross-entropy log 4 = 1.386294 per supervised token. Labels [-, 1, 2, -]: positions
    0 and 1 predict labels 1 and 2; the mean over those 2 is log 4 (over all 3 predicting positions
    0.924196). Row 1 supervises 3 tokens at logits 0 and row 0 one token at logits (2, 0, 0, 0) on label
    0: CE log(e² + 3) − 2 = 0.451929; token mean (0.451929 + 3 log 4) / 4 = 1.152703 (the mean of the
    rows' means would be 0.919112)."""
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])
    assert sft_loss(torch.zeros(1, 4, 4), labels).item() == pytest.approx(math.log(4))
    padded = torch.full((2, 10), IGNORE)                         # 6 padded columns and a row of padding
    padded[0, :4] = labels[0]
    assert sft_loss(torch.zeros(2, 10, 4), padded).item() == pytest.approx(math.log(4))
    logits = torch.zeros(2, 4, 4)
    logits[0, 0, 0] = 2.0
    labels = torch.tensor([[IGNORE, 0, IGNORE, IGNORE], [IGNORE, 1, 2, 3]])
    want = (math.log(math.e ** 2 + 3) - 2 + 3 * math.log(4)) / 4
    assert sft_loss(logits, labels).item() == pytest.approx(want)


def test_collate_masks_from_lengths_even_where_pad_is_eos():
    tok = ByteTokenizer()
    a = tokenize_trace(tok, _trace())
    b = (a[0][:10], a[1][:10])
    batch = collate_sft([a, b], tok.pad_token_id)
    assert batch["attention_mask"][0].sum() == len(a[0])     # the final EOS (== pad id) is attended
    assert batch["attention_mask"][1].sum() == 10
    assert (batch["labels"][1, 10:] == IGNORE).all()


def test_tiny_sft_fit(tmp_path):
    """`python -m grpo fit -c configs/sft_tiny.yaml`: traces generated, loss logged, eval runs."""
    from grpo.cli import main

    cli = main(["fit", "-c", "configs/sft_tiny.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path),
                "--trainer.default_root_dir", str(tmp_path), "--data.traces", str(tmp_path / "traces.jsonl")])
    assert (tmp_path / "traces.jsonl").exists()
    assert "sft/loss" in cli.trainer.logged_metrics and torch.isfinite(cli.trainer.logged_metrics["sft/loss"])
    assert "eval/well_formed" in cli.trainer.logged_metrics


# --------------------------------------------------------------------------- the fork target (fork_target: base)

def _fork_tokenizer():
    """Bytes, plus " not", " Nairobi" and " Nai" as single tokens, so that the fork falls between tokens."""
    from models.tokenizer import SPECIAL_TOKENS
    return ByteTokenizer(SPECIAL_TOKENS + (" not", " Nairobi", " Nai"))


def _recall(thought: str, answers=("Nairobi",)) -> Trace:
    return Trace(id="t", question="Q?", answers=answers, kind="memory", style="direct",
                 segments=(("model", f"<thought>{thought}</thought><answer> Nairobi</answer>"),))


def test_fork_target_keeps_the_facts_mass_and_moves_the_rest_to_the_hedge():
    """p = softmax(log [0.1, 0.2, 0.3, 0.4]): facts 1 and 2 keep 0.2 and 0.3, the hedge (0) gets 1 - 0.5."""
    from grpo.sft import fork_target
    q = fork_target(torch.tensor([0.1, 0.2, 0.3, 0.4]).log(), facts=[1, 2], hedge=0)
    assert q.tolist() == pytest.approx([0.5, 0.2, 0.3, 0.0])
    q = fork_target(torch.tensor([0.1, 0.2, 0.3, 0.4]).log(), facts=[3], hedge=2)
    assert q.tolist() == pytest.approx([0.0, 0.0, 0.6, 0.4])


def test_trace_fork_finds_the_fact_token_after_the_recalls_verb():
    """"<thought>The capital of Kenya is| Nairobi." : the fork token is the one after "... is"."""
    from grpo.sft import trace_fork
    tok = _fork_tokenizer()
    trace = _recall("The capital of Kenya is Nairobi.", answers=("Nairobi", "Nai robi"))
    ids, labels = tokenize_trace(tok, trace)
    position, facts, hedge = trace_fork(tok, trace)
    nairobi, nai, not_ = tok.convert_tokens_to_ids(" Nairobi"), tok.convert_tokens_to_ids(" Nai"), tok.convert_tokens_to_ids(" not")
    assert ids[position] == nairobi and labels[position] == nairobi
    assert tok.decode(ids[:position]).endswith("<thought>The capital of Kenya is")
    assert facts == sorted({nairobi, nai}) and hedge == not_
    hedged = _recall("The capital of Kenya is not something I know; I will search for Kenya.")
    position, _, _ = trace_fork(tok, hedged)
    assert tokenize_trace(tok, hedged)[0][position] == not_
    assert trace_fork(tok, _recall("Nairobi is the capital of Kenya.")) is None          # the fact comes first
    assert trace_fork(ByteTokenizer(), trace) is None                 # " Nairobi" and " not" both start with " "


def test_base_fork_targets_read_the_logits_that_predict_the_fork_token():
    """Rows padded to different lengths; each target is `fork_target` of the base model's logits at
    position - 1 of that row alone (unpadded), not at the fork token itself."""
    from grpo.sft import base_fork_targets, fork_target, trace_fork
    from models.loading import tiny_model
    tok = _fork_tokenizer()
    model = tiny_model(len(tok), seed=1).eval()
    traces = [_recall("So its continent is not stated."), _recall("The capital of Kenya is Nairobi.")]
    batch = collate_sft([tokenize_trace(tok, t) for t in traces], tok.pad_token_id)
    found = [(i, *trace_fork(tok, t)) for i, t in enumerate(traces)]
    rows, positions, targets = base_fork_targets(model, batch["input_ids"], batch["attention_mask"], found)
    assert rows.tolist() == [0, 1] and positions.tolist() == [f[1] for f in found]
    for k, (i, pos, facts, hedge) in enumerate(found):
        alone = torch.tensor([tokenize_trace(tok, traces[i])[0][:pos]])
        with torch.no_grad():
            want = fork_target(model(input_ids=alone).logits[0, -1], facts, hedge)
        assert torch.allclose(targets[k], want, atol=1e-5)
        assert targets[k].sum() == pytest.approx(1.0, abs=1e-5)


def test_loss_against_a_fork_target_replaces_the_label_there_only():
    """One row, three supervised labels; at the fork (label 2) the loss is -sum q log p instead of
    -log p(label). With q one-hot on the label the loss is the plain one."""
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 2.0], [0.0, 0.0, 0.0]]])  # (1, 4, 3)
    labels = torch.tensor([[IGNORE, 2, 0, 1]])
    logp = torch.log_softmax(logits[0], -1)
    plain = -(logp[0, 2] + logp[1, 0] + logp[2, 1]) / 3
    assert sft_loss(logits, labels) == pytest.approx(float(plain))
    rows, positions = torch.tensor([0]), torch.tensor([2])
    one_hot = torch.tensor([[1.0, 0.0, 0.0]])
    assert sft_loss(logits, labels, (rows, positions, one_hot)) == pytest.approx(float(plain))
    q = torch.tensor([[0.25, 0.0, 0.75]])
    want = -(logp[0, 2] + 0.25 * logp[1, 0] + 0.75 * logp[1, 2] + logp[2, 1]) / 3
    assert sft_loss(logits, labels, (rows, positions, q)) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="without a label"):
        sft_loss(logits, torch.tensor([[IGNORE, 2, IGNORE, 1]]), (rows, positions, q))


def test_fork_target_option_is_checked():
    from grpo.sft import SFTModule
    with pytest.raises(ValueError, match="'bogus'"):
        SFTModule(model_name="tiny", fork_target="bogus")
    with pytest.raises(ValueError, match="lora"):
        SFTModule(model_name="tiny", fork_target="base", lora=False)


def test_module_targets_the_forks_with_the_base_model_not_the_trained_policy(monkeypatch):
    """SFTModule(fork_target="base").batch_loss on a tiny model whose LoRA update is non-zero (so the policy
    differs from the base): the loss equals sft_loss with the targets of the model with its adapters off,
    differs from the targets of the policy itself and from the one-hot loss (fork_target "trace")."""
    import grpo.sft
    import models.loading
    from grpo.sft import SFTModule, base_fork_targets, trace_fork
    monkeypatch.setattr(models.loading, "ByteTokenizer", _fork_tokenizer)   # "tiny" gets the fork tokens
    traces = [_recall("The capital of Kenya is Nairobi."), _recall("So its continent is not stated.")]
    module = SFTModule(model_name="tiny", fork_target="base", lora_r=4)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                                  # the policy is no longer the base model
    tok = module.tokenizer
    batch = collate_sft([tokenize_trace(tok, t) for t in traces], tok.pad_token_id)
    found = [(i, *trace_fork(tok, t)) for i, t in enumerate(traces)]
    assert len(found) == 2
    seen = []                                                      # the forks batch_loss hands to sft_loss
    monkeypatch.setattr(grpo.sft, "sft_loss", lambda logits, labels, forks=None: seen.append(forks) or sft_loss(logits, labels, forks))
    with torch.no_grad():
        loss, logs = module.batch_loss(traces)
        logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with module.policy.disable_adapter():
            from_base = base_fork_targets(module.policy, batch["input_ids"], batch["attention_mask"], found)
        from_policy = base_fork_targets(module.policy, batch["input_ids"], batch["attention_mask"], found)
    assert float(loss) == pytest.approx(float(sft_loss(logits, batch["labels"], from_base)), rel=1e-5)
    rows, positions, targets = seen[0]
    assert rows.tolist() == [0, 1] and positions.tolist() == [f[1] for f in found]
    assert torch.allclose(targets, from_base[2], atol=1e-6)
    assert (targets - from_policy[2]).abs().max() > 1e-4              # 1e-3 here; 0 if the base were the policy
    assert abs(float(loss) - float(sft_loss(logits, batch["labels"]))) > 1e-3        # the one-hot loss: 0.003 away
    assert float(logs["sft/fork_share"]) == 1.0
    facts = [f[2] for f in found]
    assert float(logs["sft/fork_fact_mass"]) == pytest.approx(
        float(sum(q[ids].sum() for q, ids in zip(from_base[2], facts)) / 2), rel=1e-5)
    module.hparams.fork_target = "trace"
    with torch.no_grad():
        assert float(module.batch_loss(traces)[0]) == pytest.approx(float(sft_loss(logits, batch["labels"])), rel=1e-5)
