"""Grouped sampling with in-loop tool execution: the "o_i ~ π_old(·|q)" step of GRPO.

For B prompts we sample G completions each (N = B*G sequences) with a hand-written loop
over the model's forward and its KV cache:

    prefill   each prompt goes through the model once; its KV cache is repeated G times
    decode    one sampled token per live sequence per step (temperature, top-p)
    tool turn when a sequence's text closes `</call>`, the query is parsed, the env runs, and
              `<obs>result</obs>` is encoded *on its own* (`encode_observation`) and fed in the
              same forward as that sequence's next step. Sampled ids are never decoded and re-encoded (BPE drift),
              and no earlier token is fed to the model again: the cache is kept. A tool that
              raises, hangs or returns megabytes gives that sample a short observation (`run_tool`).
    stop      at `</answer>`, at EOS, or when the sampled-token budget runs out
    π_old     the log-prob of every sampled token under the distribution it was drawn from,
              log softmax(logits / T)[o_t], is kept (`sample_logp`): the loss uses it as π_old, so
              a gap between the sampler's numerics (fp32 decode) and the learner's (bf16 autocast)
              shows up in the ratio and is clipped, instead of being silently ignored

Over the tool budget (`max_tool_calls` executed calls), a closed call is not run: the env
answers `<obs>Tool budget exhausted: answer now.</obs>`. The completion stays well-formed (every
`</call>` has its `<obs>`), and the refused call is counted in `num_calls_no_obs`, which the
rewards charge.

Ragged steps. When some rows get observation tokens and others get one sampled token (or
nothing, once finished), every row is fed the same number L of new positions: the row's
tokens are right-aligned and the rest are pad positions masked out of attention. Position
ids come from the cumulative attention mask, so these holes do not shift positions
(PITFALLS: "A ragged batch after a tool turn"). At the end the holes are squeezed out and
each row becomes [left-padded prompt | completion | right padding], with masks built from
lengths, never from `ids != pad_id` (SmolLM2's pad token is its EOS).

Shape vocabulary: B prompts, G group size, N = B*G samples, P prompt tokens, C completion
tokens (sampled + observation), L tokens fed in one decode step, V vocabulary.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.prompts import BUDGET_OBSERVATION, encode_observation

CALL_CLOSE = re.compile(r"<\s*/\s*call\s*>", re.IGNORECASE)
ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
CALL_QUERY = re.compile(r"<\s*call\s*>(.*?)<\s*/\s*call\s*>", re.IGNORECASE | re.DOTALL)
CALL_OPEN = re.compile(r"<\s*call\s*>", re.IGNORECASE)
TAIL_TOKENS = 16  # a closing tag is searched for in the decoded last few sampled tokens
TOOL_TIMEOUT_S = 10.0  # a tool call still running after this many seconds is abandoned (see run_tool)
OBS_CHARS_PER_TOKEN = 8  # a tool's output is cut to 8 x max_obs_tokens characters before tokenizing
OVERSIZED_CHARS = 100_000  # a longer output is a malfunction (a search hit is a few hundred characters)


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

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length:]  # (N, C)

    @property
    def group_size(self) -> int:
        return int((self.group_ids == self.group_ids[0]).sum())


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip masked holes: the k-th real token of a row is at position k."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # same shape as the mask


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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)


def sampled_logprob(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T)[token] per row, in fp32: the log-prob π_old of what was just sampled.

    logits (N, V), tokens (N,) -> (N,). T = 0 (greedy) has no density: the plain softmax (T = 1) is
    used, as the loss does. With top_p < 1 (evaluation only) this is the untruncated distribution.
    """
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)                # (N, V)
    return logp.gather(-1, tokens[:, None]).squeeze(-1)                 # (N,)


def _left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _call_with_timeout(env, query: str, timeout: float):
    """`env(query)` in a worker thread; raises concurrent.futures.TimeoutError after `timeout` seconds.

    A Python thread cannot be killed: a call that hangs keeps its thread, and whatever the env
    holds, until it returns by itself; its result is then dropped. The thread is a daemon so that
    a hung call never keeps the process alive at exit (a ThreadPoolExecutor's workers are joined
    at interpreter exit, so one hung call would block the end of training).
    """
    future: Future = Future()

    def work():
        try:
            future.set_result(env(query))
        except BaseException as e:  # handed to the caller, which decides what is fatal
            future.set_exception(e)

    threading.Thread(target=work, name="tool-call", daemon=True).start()
    return future.result(timeout=timeout)


def run_tool(env, query: str, timeout: float | None = TOOL_TIMEOUT_S,
             max_chars: int | None = None) -> tuple[str, bool]:
    """The observation text for one call, and whether the tool failed (counted in `tool_errors`).

    A failing tool must not kill the other samples of the batch, so each failure becomes a short
    observation for its own sample only:
        raised     "Tool error: <exception type>"
        hung       "Tool error: timeout" after `timeout` seconds (None: no thread, wait for ever)
        oversized  longer than OVERSIZED_CHARS: failed, and cut like any output (below)
    Any output is cut to `max_chars` characters first, so that megabytes are never tokenized, and
    tag-like text is defused ("<" -> "‹") since it would corrupt the completion's format.
    """
    try:
        result = env(query) if timeout is None else _call_with_timeout(env, query, timeout)
    except FutureTimeout:  # (also a TimeoutError raised by the env itself)
        return "Tool error: timeout", True
    except Exception as e:
        return f"Tool error: {type(e).__name__}", True
    text = str(result)
    failed = len(text) > OVERSIZED_CHARS
    return text[:max_chars].replace("<", "‹"), failed


class RowState:
    """Book-keeping of one sequence during decoding (plain Python; no tensors)."""

    def __init__(self):
        self.done = False
        self.truncated = False
        self.segment: list[int] = []  # sampled ids since the last observation
        self.n_generated = 0
        self.calls = 0
        self.no_obs = 0
        self.incomplete = 0
        self.errors = 0
        self.queries: list[str] = []
        self.pending: tuple[list[int], list[int], list[float]] | None = None  # (ids, flags, logps) held back


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], env, group_size: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, max_tool_calls: int = 5,
            max_obs_tokens: int = 160, generator: torch.Generator | None = None,
            use_cache: bool = True, tool_timeout: float | None = TOOL_TIMEOUT_S,
            max_tool_wait: int = 8, show_budget: bool = False) -> Rollout:
    """Sample `group_size` completions for each prompt, executing tool calls as they close.

    `use_cache=False` re-feeds the whole sequence at every step: the slow, obviously correct
    reference the tests compare the cached loop against. `max_tool_wait`: a row whose call has
    been answered waits up to this many steps (sampling nothing) so that the tool turns of
    several rows share one forward of observation tokens (0: feed each at once). `tool_timeout`: seconds before a tool
    call is abandoned (see `run_tool`). A tool's output is cut to OBS_CHARS_PER_TOKEN x
    max_obs_tokens characters before it is tokenized, then to max_obs_tokens tokens.
    `show_budget`: each observation of an executed call ends with the calls left ("[2 searches left]").
    """
    device = next(model.parameters()).device
    G, pad_id = group_size, tokenizer.pad_token_id
    stop_ids = {tokenizer.eos_token_id}

    # 1. prefill: each prompt once, its KV cache then shared by its G samples
    prompt_ids, prompt_mask = _left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)      # (B, P)
    B, P = prompt_ids.shape
    N = B * G
    seq_ids = prompt_ids.repeat_interleave(G, dim=0)                              # (N, P)
    seq_mask = prompt_mask.repeat_interleave(G, dim=0)                            # (N, P)
    sampled = torch.zeros_like(seq_ids)                                           # (N, P) 1 where the policy sampled
    seq_logp = torch.zeros(seq_ids.shape, dtype=torch.float32, device=device)    # (N, P) π_old of sampled tokens
    cache = None
    if use_cache:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                    position_ids=position_ids_from_mask(prompt_mask), use_cache=True, logits_to_keep=1)
        cache = out.cache
        cache.batch_repeat_interleave(G)                                          # (B, …) -> (N, …)
        logits = out.logits[:, -1].repeat_interleave(G, dim=0)                    # (N, V)
    else:
        logits = model(input_ids=seq_ids, attention_mask=seq_mask,
                       position_ids=position_ids_from_mask(seq_mask), logits_to_keep=1).logits[:, -1]

    rows = [RowState() for _ in range(N)]
    waited = 0  # steps the oldest held-back tool turn has waited
    while True:
        # 2. sample one token for every live row, then run the tool where a call closed
        next_tokens = sample_next(logits, temperature, top_p, generator)           # (N,)
        next_logp = sampled_logprob(logits, next_tokens, temperature).tolist()     # N floats
        next_tokens = next_tokens.tolist()                                         # N ints
        chunks: list[list[int]] = [[] for _ in range(N)]
        flags: list[list[int]] = [[] for _ in range(N)]
        logps: list[list[float]] = [[] for _ in range(N)]
        for i, row in enumerate(rows):
            if row.done or row.pending is not None:
                continue
            tok = next_tokens[i]
            chunks[i].append(tok)
            flags[i].append(1)
            logps[i].append(next_logp[i])
            row.segment.append(tok)
            row.n_generated += 1
            tail = tokenizer.decode(row.segment[-TAIL_TOKENS:])
            if tok in stop_ids or ANSWER_CLOSE.search(tail):
                row.done = True
            elif CALL_CLOSE.search(tail):
                executed_before = row.calls
                obs = tool_turn(row, tokenizer.decode(row.segment), env, max_tool_calls, tool_timeout,
                                OBS_CHARS_PER_TOKEN * max_obs_tokens)
                calls_left = max_tool_calls - row.calls if show_budget and row.calls > executed_before else None
                obs_ids = encode_observation(tokenizer, obs, max_obs_tokens, calls_left)
                chunks[i] += obs_ids
                flags[i] += [0] * len(obs_ids)
                logps[i] += [0.0] * len(obs_ids)
                row.segment = []
                if row.n_generated < max_new_tokens and max_tool_wait > 0:  # hold back, see below
                    row.pending, chunks[i], flags[i], logps[i] = (chunks[i], flags[i], logps[i]), [], [], []
            if not row.done and row.n_generated >= max_new_tokens:
                row.done = row.truncated = True
        # held-back tool turns go in together: when no row samples any more, or after max_tool_wait steps
        holding = [r for r in rows if r.pending is not None]
        waited = waited + 1 if holding else 0
        if holding and (waited > max_tool_wait or all(r.done or r.pending is not None for r in rows)):
            for i, row in enumerate(rows):
                if row.pending is not None:
                    (chunks[i], flags[i], logps[i]), row.pending = row.pending, None
            waited = 0

        # 3. append this step's tokens (right-aligned, holes masked) to every row
        L = max(len(c) for c in chunks)
        if L == 0:
            break
        chunk_ids, chunk_mask = _left_pad(chunks, pad_id, L)                       # (N, L)
        chunk_flags, _ = _left_pad(flags, 0, L)                                    # (N, L)
        chunk_logp = torch.zeros(N, L)                                             # (N, L) right-aligned
        for i, lp in enumerate(logps):
            if lp:
                chunk_logp[i, L - len(lp):] = torch.tensor(lp)
        seq_ids = torch.cat([seq_ids, chunk_ids.to(device)], dim=1)                # (N, T+L)
        seq_mask = torch.cat([seq_mask, chunk_mask.to(device)], dim=1)             # (N, T+L)
        sampled = torch.cat([sampled, chunk_flags.to(device)], dim=1)              # (N, T+L)
        seq_logp = torch.cat([seq_logp, chunk_logp.to(device)], dim=1)             # (N, T+L)
        if all(r.done for r in rows):
            break

        # 4. forward only the new tokens (the cache holds the rest); keep the last logits
        positions = position_ids_from_mask(seq_mask)                               # (N, T+L)
        if use_cache:
            out = model(input_ids=seq_ids[:, -L:], attention_mask=seq_mask, position_ids=positions[:, -L:],
                        cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
        else:
            out = model(input_ids=seq_ids, attention_mask=seq_mask, position_ids=positions, logits_to_keep=1)
        logits = out.logits[:, -1]                                                 # (N, V)

    for row in rows:  # a `<call>` still open at the end never got its observation
        if CALL_OPEN.search(tokenizer.decode(row.segment)):
            row.incomplete += 1
            row.no_obs += 1
    return _pack(rows, tokenizer, prompt_mask, seq_ids, seq_mask, sampled, seq_logp, P, G, pad_id)


def tool_turn(row: RowState, segment_text: str, env, max_tool_calls: int, timeout: float | None = TOOL_TIMEOUT_S,
              max_chars: int | None = None) -> str:
    """Parse the query just closed, run the env (or refuse past the budget): the observation text.

    A refused call (row.calls already at max_tool_calls) gets BUDGET_OBSERVATION and counts in
    `row.no_obs`, not in `row.calls`."""
    found = CALL_QUERY.findall(segment_text)
    query = found[-1].strip() if found else ""
    if row.calls >= max_tool_calls:
        row.no_obs += 1
        return BUDGET_OBSERVATION
    row.calls += 1
    row.queries.append(query)
    result, failed = run_tool(env, query, timeout, max_chars)
    row.errors += failed
    return result


def _pack(rows, tokenizer, prompt_mask, seq_ids, seq_mask, sampled, seq_logp, P, G, pad_id) -> Rollout:
    """Squeeze the holes out of the completions and right-pad them into one tensor."""
    N = len(rows)
    comp_ids, comp_flags, comp_logp = [], [], []
    for i in range(N):
        real = seq_mask[i, P:].bool()                                              # (T-P,)
        comp_ids.append(seq_ids[i, P:][real])
        comp_flags.append(sampled[i, P:][real])
        comp_logp.append(seq_logp[i, P:][real])
    C = max(len(c) for c in comp_ids)
    device = seq_ids.device
    completion = torch.full((N, C), pad_id, dtype=torch.long, device=device)     # (N, C)
    completion_mask = torch.zeros((N, C), dtype=torch.long, device=device)       # (N, C)
    sample_logp = torch.zeros((N, C), dtype=torch.float32, device=device)        # (N, C)
    lengths = torch.tensor([len(c) for c in comp_ids], device=device)            # (N,)
    for i in range(N):
        completion[i, :lengths[i]] = comp_ids[i]
        completion_mask[i, :lengths[i]] = comp_flags[i]
        sample_logp[i, :lengths[i]] = comp_logp[i]
    real_completion = (torch.arange(C, device=device)[None, :] < lengths[:, None]).long()  # (N, C) from lengths
    prompt_ids = seq_ids[:, :P]                                                   # (N, P)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], dim=1),                    # (N, P+C)
        attention_mask=torch.cat([prompt_mask.repeat_interleave(G, dim=0), real_completion], dim=1),
        completion_mask=completion_mask,
        sample_logp=sample_logp,
        prompt_length=P,
        group_ids=torch.arange(N // G, device=device).repeat_interleave(G),
        num_calls=torch.tensor([r.calls for r in rows]),
        num_calls_no_obs=torch.tensor([r.no_obs for r in rows]),
        incomplete_calls=torch.tensor([r.incomplete for r in rows]),
        tool_errors=torch.tensor([r.errors for r in rows]),
        num_generated=torch.tensor([r.n_generated for r in rows]),
        truncated=torch.tensor([r.truncated for r in rows]),
        texts=[tokenizer.decode(comp_ids[i].tolist()) for i in range(N)],
        queries=[r.queries for r in rows],
    )
