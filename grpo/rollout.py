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

π_old. The log-prob of every sampled token under the distribution it was drawn from,
log softmax(logits / T)[o_t], is kept (`sample_logp`): the loss uses it as π_old, so a gap
between the sampler's numerics (fp32 decode) and the learner's (bf16 autocast) shows up in the
ratio and is clipped, instead of being silently ignored.

Over the tool budget (`max_tool_calls` executed calls), a closed call is not run: the env
answers `<obs>Tool budget exhausted: answer now.</obs>`. The completion stays well-formed (every
`</call>` has its `<obs>`), and the refused call is counted in `num_calls_no_obs`, which the
rewards charge.

The batch of the forward (`KVBatch`). Only rows still running are in the KV cache: a finished
row leaves it (its cache rows are dropped) and is never fed again. A decode step where every row
adds one token is one plain forward. A step where rows add different numbers of tokens (a tool
turn: the sampled token then the observation) never pads: the rows are split by how many tokens
they add, each group goes through its own forward on its own slice of the cache, and the slices
are put back together. Cached columns that hold no token (left padding of the prompts, a row
that waited) are masked out of attention; positions come from the cumulative attention mask, so
these holes do not shift positions (PITFALLS: "A ragged batch after a tool turn"), and they are
squeezed out whenever the cache is rebuilt. Closing tags are looked for only when the last
sampled token's text holds a '>' (`tag_closed`).

Shape vocabulary: B prompts, G group size, N = B*G samples, R rows in the forward batch (≤ N),
P prompt tokens, C completion tokens (sampled + observation), W cached columns, L tokens fed in
one forward, V vocabulary.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from envs.protocol import ANSWER_CLOSE, BUDGET_OBSERVATION, CALL_CLOSE, CALL_OPEN, CALL_QUERY, encode_observation
from envs.sandbox import TOOL_TIMEOUT_S, run_tool

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

# --------------------------------------------------------------------------- sampling


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

# --------------------------------------------------------------------------- tools


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

# --------------------------------------------------------------------------- one row


class RowState:
    """Book-keeping of one sequence during decoding (plain Python; no tensors)."""

    def __init__(self, prompt_len: int = 0):
        self.prompt_len = prompt_len
        self.ids: list[int] = []              # the completion so far: sampled and observation ids
        self.completion_mask: list[int] = []  # 1 where ids[k] was sampled by the policy, 0 on observations
        self.logp: list[float] = []           # π_old of ids[k] where sampled, else 0
        self.feed: list[int] = []             # the tail of `ids` not yet fed to the model
        self.held = False                     # a tool turn waiting to share a forward (max_tool_wait)
        self.segment: list[int] = []          # sampled ids since the last observation
        self.last_sampled: int | None = None
        self.n_generated = 0
        self.done = False
        self.truncated = False
        self.stop_reason: str | None = None
        self.calls = 0
        self.no_obs = 0
        self.incomplete = 0
        self.errors = 0
        self.queries: list[str] = []

    def append(self, ids: list[int], sampled: int, logp: list[float] | None = None) -> None:
        self.ids += ids
        self.completion_mask += [sampled] * len(ids)
        self.logp += logp if logp is not None else [0.0] * len(ids)
        self.feed += ids

    def stop(self, reason: str) -> None:
        self.done, self.held, self.stop_reason = True, False, reason


StopCheck = Callable[[RowState], "str | None"]  # after a row's step: a reason to stop it, or None

# --------------------------------------------------------------------------- the batch of the forward


class GrowingLayer(DynamicLayer):
    """A transformers `DynamicLayer` whose keys and values sit in buffers with spare columns.

    `DynamicLayer.update` concatenates (`torch.cat`), copying the layer's whole cache at every decode
    step (~20 % of an fp32 step of SmolLM2 with 16 rows); here a step writes its columns in place and
    the buffer is reallocated only every SPARE columns. `keys`/`values` are views of the filled part;
    assigning them (the rollout's cache surgery) replaces the buffers."""

    SPARE = 64

    @classmethod
    def of(cls, layer: DynamicLayer) -> "GrowingLayer":
        new = cls()
        new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("keys", "values")})
        new.keys, new.values = layer.keys, layer.values
        return new

    @property
    def keys(self):
        return None if self._k is None else self._k[:, :, :self._n]

    @keys.setter
    def keys(self, t):
        self._k, self._n = t, (t.shape[2] if t is not None and t.dim() == 4 else 0)

    @property
    def values(self):
        return None if self._v is None else self._v[:, :, :self._n]

    @values.setter
    def values(self, t):
        self._v = t

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n, L = self._n, key_states.shape[2]                                     # key_states (R, h, L, d)
        if n + L > self._k.shape[2]:
            spare = key_states.new_zeros(*key_states.shape[:2], L + self.SPARE, key_states.shape[3])
            self._k = torch.cat([self._k[:, :, :n], spare], dim=2)              # (R, h, n+L+SPARE, d)
            self._v = torch.cat([self._v[:, :, :n], spare], dim=2)
        self._k[:, :, n:n + L] = key_states
        self._v[:, :, n:n + L] = value_states
        self._n = n + L
        return self.keys, self.values                                           # (R, h, n+L, d)



def _squeeze(t: Tensor, mask: Tensor, width: int) -> Tensor:
    """Cached columns of each row with the holes taken out, right-aligned in `width` columns.

    t (R, h, W, d) or mask (R, W). Attention treats the cache as a set (the positions are in the
    keys already), so only which columns are real matters, and their order is kept anyway."""
    W, lengths = mask.shape[1], mask.sum(1)                                    # lengths (R,)
    own = int(lengths.max())
    if torch.equal(mask.bool(), torch.arange(W, device=mask.device) >= W - lengths[:, None]):  # no hole inside
        t = t[..., W - own:, :] if t.dim() == 4 else t[:, W - own:]           # a view, no copy
        return F.pad(t, (0, 0, width - own, 0) if t.dim() == 4 else (width - own, 0)) if width > own else t
    cols = torch.argsort(mask, dim=1, stable=True)[:, W - own:]                # (R, own) holes first
    if t.dim() == 2:
        return F.pad(t.gather(1, cols), (width - own, 0))                      # (R, width)
    t = torch.take_along_dim(t, cols[:, None, :, None], dim=2)                 # (R, h, own, d)
    return F.pad(t, (0, 0, width - own, 0))                                    # (R, h, width, d)


class KVBatch:
    """The rows that are still running, in the model's batch order, with their KV cache.

    `order[k]` is the row (0..N-1) in batch position k. The cache holds, for each of these rows,
    W columns of keys and values; `kv_mask` (R, W) says which hold a token. With use_cache=False
    (the reference path) there is no cache: each forward re-feeds the rows' whole sequences, but
    the rows go through the very same forwards, in the same order.
    """

    def __init__(self, order: list[int], cache, kv_mask: Tensor | None, prompts: list[list[int]], pad_id: int):
        self.order, self.cache, self.kv_mask = order, cache, kv_mask
        self.prompts, self.pad_id = prompts, pad_id  # prompt ids of each row (use_cache=False)

    # -- cache surgery: rows leave, or are split into groups and put back together
    def _tensors(self):
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _rebuild(self, parts: list[tuple[list[int], list[tuple[Tensor, Tensor]], Tensor]]) -> None:
        """parts: (batch positions, per-layer (keys, values), kv_mask) -> one squeezed cache in that order."""
        self.order = [self.order[k] for pos, _, _ in parts for k in pos]
        if self.cache is None:
            return
        width = max(int(mask.sum(1).max()) for _, _, mask in parts)
        for i, layer in enumerate(self.cache.layers):
            layer.keys = torch.cat([_squeeze(kv[i][0], mask, width) for _, kv, mask in parts])  # (R, h, W, d)
            layer.values = torch.cat([_squeeze(kv[i][1], mask, width) for _, kv, mask in parts])
        self.kv_mask = torch.cat([_squeeze(mask, mask, width) for _, _, mask in parts])       # (R, W)

    def _part(self, pos: list[int], saved: list[tuple[Tensor, Tensor]] | None):
        """Batch positions `pos` as they are, before any forward: a part for `_rebuild`."""
        if self.cache is None:
            return pos, [], None
        idx = torch.tensor(pos, device=self.kv_mask.device)
        return pos, [(k[idx], v[idx]) for k, v in saved], self.kv_mask[idx]

    def drop_finished(self, rows: list[RowState]) -> None:
        keep = [k for k, n in enumerate(self.order) if not rows[n].done]
        if len(keep) < len(self.order):
            self._rebuild([self._part(keep, self._tensors() if self.cache is not None else None)])

    # -- forwards
    def _forward(self, model, rows: list[RowState], pos: list[int], L: int, kv: list | None):
        """One forward of batch positions `pos`, each fed its L new tokens (or, L = 1, a masked hole
        if it has none): (last logits (len(pos), V), the cache tensors after it, the mask)."""
        feeds = [rows[self.order[k]].feed if not rows[self.order[k]].held else [] for k in pos]
        new_ids = torch.tensor([f or [self.pad_id] for f in feeds])                 # (R, L)
        new_mask = torch.tensor([[1 if f else 0] * L for f in feeds])              # (R, L)
        if self.cache is None:  # the whole sequences, left-padded
            fed = [rows[self.order[k]] for k in pos]
            seqs = [self.prompts[self.order[k]] + r.ids[:len(r.ids) - len(r.feed)] for k, r in zip(pos, fed)]
            ids, mask = _left_pad(seqs, self.pad_id)                                # (R, T)
            ids, mask = torch.cat([ids, new_ids], 1), torch.cat([mask, new_mask], 1)  # (R, T+L)
            device = next(model.parameters()).device
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=position_ids_from_mask(mask).to(device), logits_to_keep=1)
            return out.logits[:, -1], None, None
        device = self.kv_mask.device
        if kv is not None:
            for layer, (k, v) in zip(self.cache.layers, kv):
                layer.keys, layer.values = k, v
        mask = torch.cat([self.kv_mask[torch.tensor(pos, device=device)] if kv is not None else self.kv_mask,
                          new_mask.to(device)], 1)                                  # (R, W+L)
        out = model(input_ids=new_ids.to(device), attention_mask=mask,
                    position_ids=position_ids_from_mask(mask)[:, -L:], cache=self.cache, use_cache=True,
                    logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1], self._tensors() if kv is not None else None, mask

    def feed(self, model, rows: list[RowState], logits: Tensor) -> None:
        """Feed every running row its new tokens; their next-token logits go into `logits` (N, V).

        All rows adding one token (a row waiting for a tool turn adds a masked hole): one forward.
        Otherwise one forward per number of new tokens, each on its rows' slice of the cache."""
        self.drop_finished(rows)
        lengths = [0 if rows[n].held else len(rows[n].feed) for n in self.order]
        sizes = sorted({n for n in lengths if n})
        if len(sizes) == 1 and (sizes == [1] or min(lengths) > 0):
            pos = list(range(len(self.order)))
            step_logits, _, mask = self._forward(model, rows, pos, sizes[0], None)  # (R, V)
            self.kv_mask = mask
            fed = [k for k in pos if lengths[k]]
            logits[torch.tensor([self.order[k] for k in fed])] = step_logits[fed].to(logits.dtype)
        elif sizes:
            parts, saved = [], self._tensors() if self.cache is not None else None
            for L in sizes:
                pos = [k for k, n in enumerate(lengths) if n == L]
                idx = torch.tensor(pos, device=self.kv_mask.device) if self.cache is not None else None
                kv = [(k[idx], v[idx]) for k, v in saved] if self.cache is not None else None
                step_logits, kv, mask = self._forward(model, rows, pos, L, kv)    # (len(pos), V)
                logits[torch.tensor([self.order[k] for k in pos])] = step_logits.to(logits.dtype)
                parts.append((pos, kv, mask))
            idle = [k for k, n in enumerate(lengths) if n == 0]
            if idle:
                parts.append(self._part(idle, saved))
            self._rebuild(parts)
        for n in self.order:
            if not rows[n].held:
                rows[n].feed = []

# --------------------------------------------------------------------------- the steps


def prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, G: int, use_cache: bool, pad_id: int):
    """1. Each prompt through the model once; its cache repeated G times: (KVBatch, logits (N, V))."""
    B = len(prompt_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask) for _ in range(G)]  # N lists
    if not use_cache:  # the reference path re-feeds whole sequences, the prompts included
        ids, mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)  # (N, P)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       logits_to_keep=1).logits[:, -1]                                   # (N, V)
        return KVBatch(list(range(B * G)), None, None, prompts, pad_id), logits
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1)
    cache = out.cache
    if all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        cache.layers = [GrowingLayer.of(layer) for layer in cache.layers]              # in place writes, see there
    if G > 1:
        cache.batch_repeat_interleave(G)                                                 # (B, …) -> (N, …)
    kv_mask = prompt_mask.repeat_interleave(G, dim=0)                                    # (N, P)
    return KVBatch(list(range(B * G)), cache, kv_mask, prompts, pad_id), out.logits[:, -1].repeat_interleave(G, 0)


def observation(row: RowState, tokenizer, env, max_tool_calls: int, max_obs_tokens: int,
                tool_timeout: float | None, show_budget: bool) -> list[int]:
    """3. The tool turn of a row whose call just closed: run the env, the encoded `<obs>…</obs>` ids."""
    executed_before = row.calls
    obs = tool_turn(row, tokenizer.decode(row.segment), env, max_tool_calls, tool_timeout,
                    OBS_CHARS_PER_TOKEN * max_obs_tokens)
    calls_left = max_tool_calls - row.calls if show_budget and row.calls > executed_before else None
    row.segment = []
    return encode_observation(tokenizer, obs, max_obs_tokens, calls_left)


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
        num_calls=torch.tensor([r.calls for r in rows]),
        num_calls_no_obs=torch.tensor([r.no_obs for r in rows]),
        incomplete_calls=torch.tensor([r.incomplete for r in rows]),
        tool_errors=torch.tensor([r.errors for r in rows]),
        num_generated=torch.tensor([r.n_generated for r in rows]),
        truncated=torch.tensor([r.truncated for r in rows]),
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

    `use_cache=False` re-feeds the whole sequence at every forward: the slow, obviously correct
    reference the tests compare the cached loop against. `max_tool_wait`: a row whose call has
    been answered waits up to this many steps (sampling nothing) so that the tool turns of several
    rows go in at the same step (0: feed each at once); rows that add as many tokens share one
    forward. `tool_timeout`: seconds before a tool call is abandoned (see `envs.sandbox.run_tool`).
    A tool's output is cut to OBS_CHARS_PER_TOKEN x max_obs_tokens characters before it is
    tokenized, then to max_obs_tokens tokens. `show_budget`: each observation of an executed call ends with the
    calls left ("[2 searches left]"). `stop_checks`: called in order on each running row after its
    step; the first reason returned stops the row (`grpo.infer`'s safety checks).
    """
    device = next(model.parameters()).device
    G, pad_id = group_size, tokenizer.pad_token_id
    stop_ids = {tokenizer.eos_token_id}

    # 1. prefill: each prompt once, its KV cache then shared by its G samples
    prompt_ids, prompt_mask = _left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], pad_id)
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
            row.append([tok], 1, [next_logp[i]])
            row.segment.append(tok)
            row.n_generated += 1
            row.last_sampled = tok
            closed = "eos" if tok in stop_ids else tag_closed(tokenizer, row.segment)
            if closed in ("eos", "answer"):
                row.stop(closed)
            elif closed == "call":
                # 3. tool turn: the observation follows the sampled `</call>` in the row's next forward
                row.append(observation(row, tokenizer, env, max_tool_calls, max_obs_tokens, tool_timeout,
                                       show_budget), 0)
                row.held = row.n_generated < max_new_tokens and max_tool_wait > 0
            for check in stop_checks if not row.done else ():
                reason = check(row)
                if reason is not None:
                    row.stop(reason)
                    break
            if not row.done and row.n_generated >= max_new_tokens:
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
            row.incomplete += 1
            row.no_obs += 1
    # 5. pack
    return pack(rows, tokenizer, prompt_ids, prompt_mask, G, pad_id)
