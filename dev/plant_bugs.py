"""Plant known GRPO bugs in a copy of the repository, one at a time, and check the fast tests catch each.

    .venv/bin/python dev/plant_bugs.py                       # every bug, the fast suite of the files below
    .venv/bin/python dev/plant_bugs.py "kl sign,beta" tests/test_losses.py
    .venv/bin/python dev/plant_bugs.py --check               # only: does every pattern apply exactly once?

Each bug is an exact text replacement in one file: when the code it targets is rewritten, update the
pattern (a bug whose pattern is not found is reported, never silently skipped). Prints CAUGHT or
MISSED per bug, with the first failing test. Not part of CI: it runs the suite once per bug.
"""
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = ["tests/test_rollout.py", "tests/test_module.py", "tests/test_agent.py", "tests/test_losses.py",
         "tests/test_rewards.py", "tests/test_metrics.py", "tests/test_protocol.py", "tests/test_answers.py",
         "tests/test_sft.py", "tests/test_checkpoint.py", "tests/test_logprobs.py", "tests/test_lora.py",
         "tests/test_attention.py", "tests/test_models.py", "tests/test_packed.py", "tests/test_frozen_casts.py",
         "tests/test_resume.py"]
BUGS = [  # (name, file, correct code, planted bug)
    ('logp t scored with t+1', 'grpo/logprobs.py',
     'logits = out.logits[:, :-1]',
     'logits = out.logits[:, 1:]'),
    ('scoring without temperature', 'grpo/logprobs.py',
     'return token_logprobs(logits, ro.completion_ids, temperature)',
     'return token_logprobs(logits, ro.completion_ids, 1.0)'),
    ('pi_old ignored', 'grpo/module.py',
     'old_logp = ro.sample_logp ',
     'old_logp = None '),
    ('policy as pi_ref', 'grpo/module.py',
     'completion_logprobs(ref, ro.select(rows), self.hparams.temperature)',
     'completion_logprobs(self.policy, ro.select(rows), self.hparams.temperature)'),
    ('scheduler never steps', 'grpo/agent.py',
     '        self.lr_schedulers().step()\n',
     '\n'),
    ('rewards misaligned to groups', 'grpo/module.py',
     'batch[n // G].answers',
     'batch[n % len(batch)].answers'),
    ('no zero_grad', 'grpo/agent.py',
     'opt.zero_grad(set_to_none=True)',
     'pass'),
    ('kl sign', 'grpo/losses.py',
     'd = (ref_logp - logp).clamp(-clamp, clamp)',
     'd = (logp - ref_logp).clamp(-clamp, clamp)'),
    ('min instead of max', 'grpo/losses.py',
     'return torch.maximum(pg_loss1, pg_loss2), pg_loss2 > pg_loss1',
     'return torch.minimum(pg_loss1, pg_loss2), pg_loss2 > pg_loss1'),
    ('positions ignore holes', 'grpo/kvcache.py',
     'return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)',
     'return torch.arange(attention_mask.shape[-1], device=attention_mask.device).expand_as(attention_mask)'),
    ('eval at train temperature', 'grpo/evaluation.py',
     'ro = self.rollout(batch, temperature=hp.eval_temperature,',
     'ro = self.rollout(batch, temperature=1.0,'),
    ('OTC executed calls only', 'grpo/module.py',
     'attempted = (ro.num_calls[s] + ro.num_calls_no_obs[s]).tolist()',
     'attempted = ro.num_calls[s].tolist()'),
    ('sampler no temperature', 'grpo/rollout.py',
     'probs = torch.softmax(logits.float() / temperature, dim=-1)',
     'probs = torch.softmax(logits.float(), dim=-1)'),
    ('sampled logp no temperature', 'grpo/rollout.py',
     'logp = torch.log_softmax(logits.float() / t, dim=-1) ',
     'logp = torch.log_softmax(logits.float(), dim=-1) '),
    ('adv global mean', 'grpo/losses.py',
     'adv = r - r.mean(dim=1, keepdim=True)',
     'adv = r - r.mean()'),
    ('policy logp no temperature', 'grpo/module.py',
     'logp = completion_logprobs(self.policy, ro.select(rows), hp.temperature)',
     'logp = completion_logprobs(self.policy, ro.select(rows))'),
    ('ref logp no temperature', 'grpo/module.py',
     'completion_logprobs(ref, ro.select(rows), self.hparams.temperature)',
     'completion_logprobs(ref, ro.select(rows))'),
    ('micro-batch normalised by its own count', 'grpo/module.py',
     'normaliser=normaliser)',
     'normaliser=None)'),
    ('beta sign', 'grpo/losses.py',
     'per_token = per_token + beta * kl',
     'per_token = per_token - beta * kl'),
    ('token mean over all positions', 'grpo/losses.py',
     'return cls(tokens=m.sum(), sequences=',
     'return cls(tokens=torch.tensor(m.numel()), sequences='),
    ('clip low uses eps_high', 'grpo/losses.py',
     'torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)',
     'torch.clamp(ratio, 1 - eps_high, 1 + eps_high)'),
    ('population std', 'grpo/losses.py',
     'adv = adv / (r.std(dim=1, keepdim=True) + eps)',
     'adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps)'),
    ('direct bonus ignores refused', 'grpo/rewards.py',
     'direct = num_calls == num_calls_no_obs == 0',
     'direct = num_calls == 0'),
    ('sft labels on observations', 'grpo/sft.py',
     'labels += [IGNORE] * len(piece)',
     'labels += piece'),
    ('sft loss misaligned', 'grpo/sft.py',
     'logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten()',
     'logits[:, :-1].flatten(0, 1).float(), labels[:, :-1].flatten()'),
    ('prefill tiled wrong', 'grpo/kvcache.py',
     'out.logits[:, -1].repeat_interleave(G, 0)',
     'out.logits[:, -1].repeat(G, 1)'),
    ('obs get gradient', 'grpo/rollout.py',
     'self.completion_mask += [0] * len(ids)',
     'self.completion_mask += [1] * len(ids)'),
    ('eos dropped', 'grpo/rollout.py',
     'real_completion = (torch.arange(C)[None, :] < lengths[:, None]).long()',
     'real_completion = (completion != pad_id).long()'),
    ('cache tiled wrong', 'grpo/kvcache.py',
     '        cache.batch_repeat_interleave(G)  ',
     '        cache.batch_repeat_interleave(1)  '),
    ('mu=1 ratio keeps gradient', 'grpo/losses.py',
     'old = logp.detach() if old_logp is None else',
     'old = logp if old_logp is None else'),
    ('groups interleaved', 'grpo/losses.py',
     'r = r.view(-1, group_size)',
     'r = r.view(group_size, -1).t()'),
    ('zero-spread groups not zeroed', 'grpo/losses.py',
     'adv = torch.where(zero_spread[:, None], torch.zeros_like(adv), adv)',
     'adv = adv'),
    ('prompt kv detached', 'grpo/logprobs.py',
     'kv = [(layer.keys, layer.values) for layer',
     'kv = [(layer.keys.detach(), layer.values.detach()) for layer'),
    ('fast pass unshifted', 'grpo/logprobs.py',
     'states = torch.cat([h_last[g][:, None], h[:, :-1]], dim=1)',
     'states = h'),
    ('prompts tiled in pack', 'grpo/rollout.py',
     'input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), completion',
     'input_ids=torch.cat([prompt_ids.repeat(G, 1), completion'),
    ('warm-up never ends', 'grpo/agent.py',
     'if step < warmup:',
     'if step < total_steps:'),
    ('cosine stops at half', 'grpo/agent.py',
     'math.cos(math.pi * min(1.0, progress))',
     'math.cos(0.5 * math.pi * min(1.0, progress))'),
    ('no gradient clipping', 'grpo/agent.py',
     'if self.hparams.max_grad_norm:',
     'if False:'),
    ('tool outage picks the wrong group', 'grpo/rollout.py',
     'envs[i // G]',
     'envs[i % len(envs)]'),
    ('training rollout ignores the outages', 'grpo/module.py',
     'group_size=G, env=envs)',
     'group_size=G)'),
    ('judge does not fold accents', 'data/answers.py',
     'for ch in fold_accents(s).lower()',
     'for ch in s.lower()'),
    ('misread judged on the whole text', 'grpo/evaluation.py',
     'contains_gold(" ".join(observations(text)), golds)',
     'contains_gold(text, golds)'),
    ('grounding ignores the question', 'grpo/rewards.py',
     'count(" ".join(thoughts(text))) > count(question)',
     'count(" ".join(thoughts(text))) > 0'),
    ('grounding: any mention of the question word disqualifies', 'grpo/rewards.py',
     'count(" ".join(thoughts(text))) > count(question)',
     'count(" ".join(thoughts(text))) > 0 and not count(question)'),
    ('grounding reads the whole text', 'grpo/rewards.py',
     'count(" ".join(thoughts(text))) > count(question)',
     'count(text) > count(question)'),
    ('ungrounded penalty on searched answers', 'grpo/rewards.py',
     'weights.ungrounded_direct if not grounded and direct else 0.0',
     'weights.ungrounded_direct if not grounded else 0.0'),
    ('grounded against the wrong question', 'grpo/module.py',
     'answer_grounded(ro.texts[n], batch[n // G].question)',
     'answer_grounded(ro.texts[n], batch[n % len(batch)].question)'),
    ('LoRA merged under the step\'s autocast (bf16 weights)', 'models/lora.py',
     'with torch.autocast(W.device.type, enabled=False):',
     'with contextlib.nullcontext():'),
    ('policy update under a caching autocast', 'grpo/module.py',
     '        for i, rows in enumerate(micro):\n            logp = completion_logprobs(self.policy,',
     '        for i, rows in enumerate(micro):\n            torch.set_autocast_cache_enabled(True)\n'
     '            logp = completion_logprobs(self.policy,'),
    ('trainable weights cast once too (no gradient)', 'models/frozen_casts.py',
     'w is not None and not w.requires_grad and w.dtype == torch.float32',
     'w is not None and w.dtype == torch.float32'),
    ('a frozen cast served stale after the weight changed', 'models/frozen_casts.py',
     'or (w._version, w.data_ptr()) != self.version):',
     'or False):'),
    ('loss passes without the frozen casts', 'grpo/module.py',
     'with frozen_casts(self.policy):',
     'with frozen_casts(None):'),
    ('pi_ref copy not cast once', 'grpo/module.py',
     'frozen_casts(self.ref_model):',
     'frozen_casts(None):'),
    ('truncation keeps the smallest singular values', 'models/lora.py',
     'U, S, Vh = torch.linalg.svd(d.scale * RB @ RA.T, full_matrices=False)',
     'U, S, Vh = torch.linalg.svd(d.scale * RB @ RA.T, full_matrices=False); U, S, Vh = U.flip(-1), S.flip(-1), Vh.flip(0)'),
    ('truncation drops the LoRA scale', 'models/lora.py',
     'torch.linalg.svd(d.scale * RB @ RA.T, full_matrices=False)',
     'torch.linalg.svd(RB @ RA.T, full_matrices=False)'),
    ('rsLoRA adapter read with scale alpha / r', 'models/lora.py',
     'alpha / math.sqrt(r) if config.get("use_rslora")',
     'alpha / r if config.get("use_rslora")'),
    ('adapter read with scale alpha * r', 'models/lora.py',
     'else alpha / r',
     'else alpha * r'),
    ('decoding weights cast back instead of given back', 'models/loading.py',
     '            p.data = data\n',
     '            p.data = p.data.to(data.dtype)\n'),
    ('rollout_dtype ignored', 'grpo/agent.py',
     'weights_in(policy, self.rollout_torch_dtype)',
     'weights_in(policy, None)'),
    ("sampled log-softmax backward: softmax term's sign", 'grpo/logprobs.py',
     '.exp_().mul_(-g[:, None])',
     '.exp_().mul_(g[:, None])'),
    ('sampled log-softmax backward: one-hot term without /T', 'grpo/logprobs.py',
     'dz.scatter_add_(-1, targets[:, None], g[:, None])',
     'dz.scatter_add_(-1, targets[:, None], grad[:, None])'),
    ('sampled log-softmax backward: /T dropped', 'grpo/logprobs.py',
     'g = grad / T ',
     'g = grad '),
    ('sampled log-softmax backward writes into the saved logits', 'grpo/logprobs.py',
     'dz = z.to(lse.dtype, copy=True)',
     'dz = z.to(lse.dtype)'),
    ('rollout attention mask skipped again', 'models/attention.py',
     'kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)',
     'kwargs.update(allow_is_causal_skip=True, allow_is_bidirectional_skip=True)'),
    ('evaluation samples from the training stream', 'grpo/evaluation.py',
     'top_p=hp.eval_top_p, generator=self.eval_generator(batch_idx))',
     'top_p=hp.eval_top_p)'),
    ('token means not scaled by the token share', 'grpo/metrics.py',
     '"loss/clip_frac": out.clip_frac * token_share, "loss/ratio_mean": out.ratio_mean * token_share',
     '"loss/clip_frac": out.clip_frac, "loss/ratio_mean": out.ratio_mean'),
    ('pi_ref scored with dropout', 'models/loading.py',
     'yield model.eval()',
     'yield model'),
    ('packed linear drops its bias', 'models/packed.py',
     '_linear_pointwise(x, self.packed, self.bias,',
     '_linear_pointwise(x, self.packed, None,'),
    ('instance forwards (packed, frozen casts) never given back', 'models/loading.py',
     '            del module.forward ',
     '            pass '),
    # the module's options reach the loss functions (each function is tested alone too)
    ('module ignores scale_by_std', 'grpo/module.py',
     'group_advantages(rewards, G, hp.scale_by_std)',
     'group_advantages(rewards, G)'),
    ('module drops clip_eps_high', 'grpo/module.py',
     'hp.clip_eps, hp.clip_eps_high, hp.beta, hp.token_level,',
     'hp.clip_eps, None, hp.beta, hp.token_level,'),
    ('module hard-codes clip_eps', 'grpo/module.py',
     'hp.clip_eps, hp.clip_eps_high, hp.beta, hp.token_level,',
     '0.2, hp.clip_eps_high, hp.beta, hp.token_level,'),
    ('module drops beta (KL logged, never applied)', 'grpo/module.py',
     'hp.clip_eps, hp.clip_eps_high, hp.beta, hp.token_level,',
     'hp.clip_eps, hp.clip_eps_high, 0.0, hp.token_level,'),
    ('module ignores token_level', 'grpo/module.py',
     'hp.clip_eps, hp.clip_eps_high, hp.beta, hp.token_level,',
     'hp.clip_eps, hp.clip_eps_high, hp.beta, True,'),
    ('sft mean over every position', 'grpo/sft.py',
     '    return ce.sum() / supervised.sum()',
     '    return ce.sum() / supervised.numel()'),
    ('sampled ids re-encoded from their text', 'grpo/rollout.py',
     '        completion[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)',
     '        completion[i, :len(r.ids)] = torch.tensor((tokenizer.encode(tokenizer.decode(r.ids), add_special_tokens=False) + r.ids)[:len(r.ids)], dtype=torch.long)'),  # same length: no crash
    ('all-search groups counted as split', 'grpo/losses.py',
     'return (searched > 0) & (searched < group_size)',
     'return searched > 0'),
    ('redraw queue not restored on resume', 'data/loader.py',
     'self.queue, self.last = [list(q) for q in state["queue"]], [list(q) for q in state["last"]]',
     'self.queue, self.last = [], [list(q) for q in state["last"]]'),
    ('redraws without limit', 'data/loader.py',
     'if a and r < self.max_redraws]',
     'if a]'),
    ('module never asks for redraws', 'grpo/module.py',
     'loader.feedback(again.tolist())',
     'pass'),
]


def check_patterns() -> bool:
    """Every bug's pattern occurs exactly once in its file (run after moving or rewriting code)."""
    ok = True
    for name, file, old, _ in BUGS:
        count = (REPO / file).read_text().count(old) if (REPO / file).exists() else 0
        if count != 1:
            print(f"{name}: the pattern occurs {count} times in {file} (update dev/plant_bugs.py)")
            ok = False
    print(f"{len(BUGS)} patterns: {'each applies exactly once' if ok else 'NOT ALL APPLY'}")
    return ok


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if check_patterns() else 1)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] != "all" else None
    tests = sys.argv[2:] or TESTS
    for name, file, old, new in BUGS:
        if names and not any(n in name for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = pathlib.Path(tmp) / "repo"
            shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "outputs", "__pycache__"))
            src = (copy / file).read_text()
            if src.count(old) != 1:
                print(f"{name}: PATTERN NOT FOUND in {file} (update dev/plant_bugs.py)", flush=True)
                continue
            (copy / file).write_text(src.replace(old, new))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                                *tests], cwd=copy, capture_output=True, text=True)
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")][:1]
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'} {failed}", flush=True)


if __name__ == "__main__":
    main()
