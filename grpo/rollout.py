"""Grouped sampling with in-loop tool execution: the "o_i ~ π_old(·|q)" step of GRPO.

For B prompts we sample G completions each (N = B*G sequences) with a hand-written loop
over the model's forward and its KV cache. `rollout` reads as these steps:

    1. prefill   each prompt goes through the model once; its KV cache is repeated G times
    2. sample    one token for every row (temperature, top-p); its log-prob π_old is recorded
    3. tool turn when a row's text closes `</call>`, the query is parsed, the env runs, and
                 `<obs>result</obs>` is encoded *on its own* (`encode_observation`); sampled ids
                 are never decoded and re-encoded (BPE drift). A tool that raises, hangs or returns
                 megabytes gives that sample a short observation (`envs.sandbox.run_tool`).
       stop      at `</answer>`, at EOS, when a `stop_checks` hook says so (`grpo.infer`'s safety
                 checks), or when the sampled-token budget runs out
    4. feed      the rows still running get their new tokens (the sampled one, plus the observation
                 after a tool turn) through the model; the cache keeps the rest, no token is fed twice
    5. pack      the rows become one tensor [left-padded prompt | completion | right padding], masks
                 built from lengths, never from `ids != pad_id` (SmolLM2's pad token is its EOS)

Steps 1 and 4 (which rows go through which forward, and how their KV cache moves) are
`grpo.kvcache`'s; every forward of the loop gives attention an explicit mask (`models.attention`),
and the linear layers on CPU their weights packed once per rollout (`models.packed`).
Each row keeps its `completion_mask`: 1 on the tokens it sampled, 0 on the observation tokens
forced after a call.

π_old. The log-prob of every sampled token under the distribution it was drawn from,
log softmax(logits / T)[o_t] with T the temperature, is kept (`sample_logp`): the loss uses it as
π_old, so a gap between the sampler's numerics (fp32 decode) and the learner's (bf16 autocast)
shows up in the ratio and is clipped, instead of being silently ignored.

Over the tool budget (`max_tool_calls` executed calls), a closed call is not run: the env
answers `<obs>Tool budget exhausted: answer now.</obs>`. The completion stays well-formed (every
`</call>` has its `<obs>`), and the refused call is counted in `num_calls_no_obs`, which the
rewards charge. Closing tags are looked for only when the last sampled token's text holds a '>'
(`tag_closed`).

Shapes: see `grpo/__init__.py` (B, G, N, P, C, V).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from envs.protocol import ANSWER_CLOSE, BUDGET_OBSERVATION, CALL_CLOSE, CALL_OPEN, CALL_QUERY, encode_observation
from envs.sandbox import TOOL_TIMEOUT_S, run_tool
from grpo.kvcache import left_pad, prefill
from models.attention import masked_sdpa
from models.packed import packed_linears

TAIL_TOKENS = 16  # a closing tag is searched for in the decoded last few sampled tokens
OBS_CHARS_PER_TOKEN = 8  # a tool's output is cut to 8 x max_obs_tokens characters before tokenizing


@dataclass
class Rollout:
    """B*G sampled completions, ready for the reward and the loss.

    Sample n belongs to group `group_ids[n]` = n // G: the G samples of a prompt are consecutive.
    """
    input_ids: Tensor         # (N, P+C) [left-padded prompt | completion | right padding]
    attention_mask: Tensor    # (N, P+C) 1 on prompt, sampled and observation tokens
    completion_mask: Tensor   # (N, C)   1 only on tokens the policy sampled (0: observations, padding)
    sample_logp: Tensor       # (N, C)   log π_old(o_t | ·) of each sampled token at the sampling temperature
                              #          (T = 0: the plain softmax), fp32; 0 where completion_mask is 0
    prompt_length: int        # P, the column where completions start
    group_ids: Tensor         # (N,)     index of the prompt each sample answers
    num_calls: Tensor         # (N,)     tool calls the env executed
    num_calls_no_obs: Tensor  # (N,)     calls not run: refused over the budget (they get the budget
                              #          observation), or `<call>` never closed
    incomplete_calls: Tensor  # (N,)     `<call>` opened and never closed (subset of num_calls_no_obs)
    tool_errors: Tensor       # (N,)     executed calls whose tool raised (an error observation was given)
    num_generated: Tensor     # (N,)     tokens sampled by the policy
    truncated: Tensor         # (N,)     bool, stopped by the token budget
    texts: list[str]          # N decoded completions (observations included)
    queries: list[list[str]]  # N lists of the executed queries
    stop_reasons: list[str] = field(default_factory=list)  # N: "answer", "eos", "budget" or a stop_checks reason

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length:]  # (N, C)

    @property
    def group_size(self) -> int:
        return int((self.group_ids == self.group_ids[0]).sum())

    def select(self, rows: Tensor) -> "Rollout":
        """The samples `rows` (n,) of this rollout, in that order (a micro-batch of the loss passes).
        Widths P and C are kept: the micro-batch's (n, C) log-probs line up with the batch's."""
        N, keep = self.input_ids.shape[0], rows.tolist()

        def pick(value):
            if isinstance(value, Tensor):
                return value[rows.to(value.device)]                          # (n, ...)
            if isinstance(value, list) and len(value) == N:
                return [value[i] for i in keep]
            return value                                                     # P; stop_reasons when not recorded
        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in fields(self)})

# --------------------------------------------------------------------------- sampling


def sample_next(logits: Tensor, temperature: float, top_p: float, generator=None) -> Tensor:
    """One token per row from logits (N, V): greedy at temperature 0, else top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)                                  # (N,)
    probs = torch.softmax(logits.float() / temperature, dim=-1)   # (N, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)     # (N, V)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p          # mass before this token already > p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return inverse_cdf_sample(probs, generator)                     # (N,)


def inverse_cdf_sample(probs: Tensor, generator=None, block: int = 256, u: Tensor | None = None) -> Tensor:
    """One token per row of probs (N, V): the first token whose cumulative mass exceeds u·total, u ~ U[0, 1).

    One uniform per row, so a step draws N numbers whatever the vocabulary (`torch.multinomial`
    draws one exponential per token: 3.5-10x slower for 16 rows of SmolLM2's 49k on this CPU). The
    cumulative sum runs in blocks of `block` tokens in fp32 and across blocks in fp64, so a token's
    rounding error is ~1e-7 of its block's mass rather than of the mass before it (the fp32 values of
    one cumsum over 49k tokens are spaced by their ulp, ~6e-8 near 1: tail tokens would be drawn
    dozens at a time); tokens of zero mass (top-p cut) are never drawn; a row with no finite
    positive mass (NaN logits) is an error.
    `u` (N,): the uniforms to use instead of drawing them (tests).
    """
    N, V = probs.shape
    nb = -(-V // block)
    p = F.pad(probs.float(), (0, nb * block - V)).view(N, nb, block)                   # (N, nb, block)
    within = p.cumsum(-1)                                                              # (N, nb, block) fp32
    across = within[..., -1].double().cumsum(-1)                                       # (N, nb) fp64
    bad = ~(torch.isfinite(across[:, -1]) & (across[:, -1] > 0) & (p >= 0).all(-1).all(-1))
    if bad.any():
        raise ValueError(f"sampling: rows {bad.nonzero().flatten().tolist()[:8]} have no finite, non-negative "
                         f"probability mass (NaN or inf logits?)")
    if u is None:
        u = torch.rand(N, generator=generator, dtype=torch.float64, device=probs.device)
    u = u.double()[:, None] * across[:, -1:]                                           # (N, 1)
    b = torch.searchsorted(across, u, right=True).clamp_(max=nb - 1)                  # (N, 1) block holding u
    start = torch.where(b > 0, across.gather(-1, (b - 1).clamp(min=0)), 0.0)           # (N, 1) mass before it
    cum = within.gather(1, b[:, :, None].expand(N, 1, block)).squeeze(1).double()      # (N, block)
    r = torch.minimum(u - start, cum[:, -1:] * (1 - 1e-12))  # (N, 1) inside the block (min: fp64 rounding)
    j = torch.searchsorted(cum, r, right=True).clamp_(max=block - 1)                   # (N, 1)
    return (b * block + j).squeeze(-1)                                                 # (N,)


def sampled_logprob(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T)[token] per row, in fp32: the log-prob π_old of what was just sampled.

    logits (N, V), tokens (N,) -> (N,). T = 0 (greedy) has no density: the plain softmax (T = 1) is
    used, as the loss does. With top_p < 1 (evaluation only) this is the untruncated distribution.
    """
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)                # (N, V)
    return logp.gather(-1, tokens[:, None]).squeeze(-1)                 # (N,)


# --------------------------------------------------------------------------- closing tags

_GT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _gt_ids(tokenizer) -> frozenset[int]:
    """Ids whose text contains '>' (every closing tag ends with one), computed once per tokenizer."""
    try:
        return _GT_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = frozenset(i for i, text in enumerate(texts) if ">" in text)
    try:
        _GT_IDS[tokenizer] = ids
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return ids


def tag_closed(tokenizer, segment: list[int]) -> str | None:
    """"answer" or "call" if the sampled `segment` now ends a `</answer>` or `</call>`, else None.

    A tag can be one token (the byte tokenizer's special tokens) or several ("</", "call", ">"),
    and its '>' can sit inside a bigger token ("></"): so the text of the last TAIL_TOKENS tokens
    is matched, but only at the steps whose last token's text holds a '>', the one character
    without which no closing tag can have just appeared."""
    if not segment or segment[-1] not in _gt_ids(tokenizer):
        return None
    tail = tokenizer.decode(segment[-TAIL_TOKENS:])
    if ANSWER_CLOSE.search(tail):
        return "answer"
    if CALL_CLOSE.search(tail):
        return "call"
    return None

# --------------------------------------------------------------------------- one row


class RowState:
    """Book-keeping of one sequence during decoding (plain Python; no tensors). The counters
    (ROW_COUNTERS) have the names of the `Rollout` fields they become."""

    def __init__(self, prompt_len: int = 0):
        self.prompt_len = prompt_len
        self.ids: list[int] = []              # the completion so far: sampled and observation ids
        self.completion_mask: list[int] = []  # 1 where ids[k] was sampled by the policy, 0 on observations
        self.logp: list[float] = []           # π_old of ids[k] where sampled, else 0
        self.feed: list[int] = []             # the tail of `ids` not yet fed to the model
        self.held = False                     # a tool turn waiting to share a forward (max_tool_wait)
        self.segment: list[int] = []          # sampled ids since the last observation
        self.last_sampled: int | None = None
        self.done = False
        self.truncated = False
        self.stop_reason: str | None = None
        self.num_generated = 0
        self.num_calls = 0
        self.num_calls_no_obs = 0
        self.incomplete_calls = 0
        self.tool_errors = 0
        self.queries: list[str] = []

    def append_sampled(self, token: int, logp: float) -> None:
        """A token the policy sampled (completion mask 1), with its log-prob π_old."""
        self.ids.append(token)
        self.completion_mask.append(1)
        self.logp.append(logp)
        self.feed.append(token)
        self.segment.append(token)
        self.last_sampled = token
        self.num_generated += 1

    def append_forced(self, ids: list[int]) -> None:
        """Observation tokens forced after a call (completion mask 0: no loss, no KL)."""
        self.ids += ids
        self.completion_mask += [0] * len(ids)
        self.logp += [0.0] * len(ids)
        self.feed += ids

    def stop(self, reason: str) -> None:
        self.done, self.held, self.stop_reason = True, False, reason


ROW_COUNTERS = ("num_calls", "num_calls_no_obs", "incomplete_calls", "tool_errors", "num_generated", "truncated")
StopCheck = Callable[[RowState], "str | None"]  # after a row's step: a reason to stop it, or None

# --------------------------------------------------------------------------- the steps


def observation(row: RowState, tokenizer, env, max_tool_calls: int, max_obs_tokens: int,
                tool_timeout: float | None, show_budget: bool) -> list[int]:
    """3. The tool turn of a row whose `</call>` was just sampled: the encoded `<obs>…</obs>` ids.

    The query is the last `<call>` of the row's segment. The env runs it (`envs.sandbox.run_tool`: a
    tool that raises, hangs or floods gives a short observation and counts in `tool_errors`); its
    output is cut to OBS_CHARS_PER_TOKEN x max_obs_tokens characters, then to max_obs_tokens tokens.
    A call over the budget (row.num_calls already at max_tool_calls) is not run: it gets
    BUDGET_OBSERVATION and counts in `num_calls_no_obs`, not in `num_calls`. show_budget: the
    observation of an executed call ends with the calls left."""
    found = CALL_QUERY.findall(tokenizer.decode(row.segment))
    row.segment = []
    if row.num_calls >= max_tool_calls:
        row.num_calls_no_obs += 1
        return encode_observation(tokenizer, BUDGET_OBSERVATION, max_obs_tokens)
    row.num_calls += 1
    row.queries.append(found[-1].strip() if found else "")
    result, failed = run_tool(env, row.queries[-1], tool_timeout, OBS_CHARS_PER_TOKEN * max_obs_tokens)
    row.tool_errors += failed
    calls_left = max_tool_calls - row.num_calls if show_budget else None
    return encode_observation(tokenizer, result, max_obs_tokens, calls_left)


def pack(rows: list[RowState], tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, G: int, pad_id: int) -> Rollout:
    """5. The rows as one tensor: [left-padded prompt | completion | right padding], masks from lengths."""
    N, P = len(rows), prompt_ids.shape[1]
    C = max(len(r.ids) for r in rows)
    completion = torch.full((N, C), pad_id, dtype=torch.long)                     # (N, C)
    completion_mask = torch.zeros((N, C), dtype=torch.long)                       # (N, C)
    sample_logp = torch.zeros((N, C), dtype=torch.float32)                        # (N, C)
    for i, r in enumerate(rows):
        completion[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        completion_mask[i, :len(r.ids)] = torch.tensor(r.completion_mask, dtype=torch.long)
        sample_logp[i, :len(r.ids)] = torch.tensor(r.logp, dtype=torch.float32)
    lengths = torch.tensor([len(r.ids) for r in rows])                            # (N,)
    real_completion = (torch.arange(C)[None, :] < lengths[:, None]).long()        # (N, C) from lengths
    device = prompt_ids.device
    return Rollout(
        input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), completion.to(device)], dim=1),        # (N, P+C)
        attention_mask=torch.cat([prompt_mask.repeat_interleave(G, 0), real_completion.to(device)], 1),  # (N, P+C)
        completion_mask=completion_mask.to(device),
        sample_logp=sample_logp.to(device),
        prompt_length=P,
        group_ids=torch.arange(N // G, device=device).repeat_interleave(G),
        **{name: torch.tensor([getattr(r, name) for r in rows]) for name in ROW_COUNTERS},  # (N,) each
        texts=[tokenizer.decode(r.ids) for r in rows],
        queries=[r.queries for r in rows],
        stop_reasons=[r.stop_reason for r in rows],
    )

# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], env, group_size: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, max_tool_calls: int = 5,
            max_obs_tokens: int = 160, generator: torch.Generator | None = None,
            use_cache: bool = True, tool_timeout: float | None = TOOL_TIMEOUT_S,
            max_tool_wait: int = 8, show_budget: bool = False,
            stop_checks: Sequence[StopCheck] = ()) -> Rollout:
    """Sample `group_size` completions for each prompt, executing tool calls as they close.

    `env`: the search tool, or a sequence of B tools, one per prompt (its G samples all call that one;
    `GRPOModule`'s tool outages). `use_cache=False` re-feeds the whole sequence at every forward: the
    slow, obviously correct reference the tests compare the cached loop against. `max_tool_wait`: a
    row whose call has been answered waits up to this many steps (sampling nothing) so that the tool
    turns of several rows go in at the same step (0: feed each at once); rows that add as many
    tokens share one forward. `tool_timeout`: seconds before a tool call is abandoned (see
    `envs.sandbox.run_tool`). A tool's output is cut to OBS_CHARS_PER_TOKEN x max_obs_tokens
    characters before it is tokenized, then to max_obs_tokens tokens. `show_budget`: each
    observation of an executed call ends with the calls left ("[2 searches left]"). `stop_checks`:
    called in order on each running row after its step; the first reason returned stops the row
    (`grpo.infer`'s safety checks).
    """
    device = next(model.parameters()).device
    G, pad_id = group_size, tokenizer.pad_token_id
    envs = list(env) if isinstance(env, (list, tuple)) else [env] * len(prompts)
    if len(envs) != len(prompts):
        raise ValueError(f"rollout: {len(envs)} envs for {len(prompts)} prompts (one env, or one per prompt)")
    stop_ids = {tokenizer.eos_token_id}

    # every forward below gives SDPA an explicit mask, also where it has no hole (models/attention.py:
    # transformers would drop it, and the mask-free SDPA call is the slower one on CPU in bf16); the
    # linear layers on CPU call oneDNN with weights packed once, not at every call (models/packed.py)
    with masked_sdpa(model), packed_linears(model, rows=len(prompts) * G):
        # 1. prefill: each prompt once, its KV cache then shared by its G samples
        prompt_ids, prompt_mask = left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], pad_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)      # (B, P)
        batch, logits = prefill(model, prompt_ids, prompt_mask, G, use_cache, pad_id)  # logits (N, V)
        rows = [RowState(len(p)) for p in batch.prompts]
        waited = 0  # steps the oldest held-back tool turn has waited
        while True:
            # 2. sample one token for every row (all N, running or not: the RNG stream does not depend
            #    on which rows are still running)
            next_tokens = sample_next(logits, temperature, top_p, generator)           # (N,)
            next_logp = sampled_logprob(logits, next_tokens, temperature).tolist()     # N floats
            next_tokens = next_tokens.tolist()                                         # N ints
            for i, row in enumerate(rows):
                if row.done or row.held:
                    continue
                tok = next_tokens[i]
                row.append_sampled(tok, next_logp[i])
                closed = "eos" if tok in stop_ids else tag_closed(tokenizer, row.segment)
                if closed in ("eos", "answer"):
                    row.stop(closed)
                elif closed == "call":
                    # 3. tool turn: the observation follows the sampled `</call>` in the row's next forward
                    row.append_forced(observation(row, tokenizer, envs[i // G], max_tool_calls, max_obs_tokens,
                                                  tool_timeout, show_budget))
                    row.held = row.num_generated < max_new_tokens and max_tool_wait > 0
                for check in stop_checks if not row.done else ():
                    reason = check(row)
                    if reason is not None:
                        row.stop(reason)
                        break
                if not row.done and row.num_generated >= max_new_tokens:
                    row.stop("budget")
                    row.truncated = True
            # held-back tool turns go in together: when no row samples any more, or after max_tool_wait steps
            holding = any(r.held for r in rows)
            waited = waited + 1 if holding else 0
            if holding and (waited > max_tool_wait or all(r.done or r.held for r in rows)):
                for r in rows:
                    r.held = False
                waited = 0
            if all(r.done for r in rows):
                break

            # 4. feed the running rows their new tokens (the cache holds the rest); keep the last logits
            batch.feed(model, rows, logits)

        for row in rows:  # a `<call>` still open at the end never got its observation
            if CALL_OPEN.search(tokenizer.decode(row.segment)):
                row.incomplete_calls += 1
                row.num_calls_no_obs += 1
        # 5. pack
        return pack(rows, tokenizer, prompt_ids, prompt_mask, G, pad_id)
