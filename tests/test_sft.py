"""Cold start: trace tokenization masks prompt and observations; the tiny SFT run trains."""
from __future__ import annotations

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
