"""Per-token log-probabilities of the completion tokens: log π(o_t | q, o_<t).

Two implementations of the same numbers (tests/test_logprobs.py checks that they agree, values
and gradients):

`completion_logprobs_padded` (the plain one, the reference): one forward of the padded
(N, P+C) batch, vocabulary-sized logits at the C+1 last positions (`logits_to_keep`), a
log-softmax in fp32 one sample at a time.

`completion_logprobs` (the one the loss uses) computes less, exactly:
  1. the prompt once per group: the B distinct prompts go through the decoder once (with
     gradient in the training pass); their keys/values are then shared by the G completions
     of each group (cache rows selected by group id), instead of the prompt being recomputed
     G times. Gradient flows back into the prompt through the shared keys/values.
  2. no padded completion positions: completions are sorted by length and cut into
     buckets (`length_buckets`) whose padding costs less than one more forward would.
  3. the log-prob of the sampled token only, at sampled positions only (observation and
     padding positions get 0: the completion mask removes them from the loss), from the final
     hidden states h in chunks of positions:
         log π(y | h) = z_y / T - logsumexp(z / T),   z = W h   (the LM head)
     in fp32 per chunk, by one autograd function (`SampledLogSoftmax`) whose backward is written
     out, ∂/∂z = (onehot(y) - softmax(z / T)) / T: the backward keeps the chunk's logits in the
     dtype the head produced them (bf16 under autocast) and no fp32 (n, V) graph.

`loss_micro_batches` cuts a rollout into micro-batches of whole groups under a token budget:
`GRPOModule` computes the loss passes one micro-batch at a time (a backward each), so that their
memory is bounded by the budget, not by B*G.

Both use the sampling temperature (PITFALLS: the loss must see the distribution that sampled
the tokens, trl #4159). Shapes: B, G, N = B*G, P, C, L (the tokens of a length bucket), V (see
`grpo/__init__.py`); here also M sampled tokens (Σ completion_mask) and d the hidden size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grpo.kvcache import position_ids_from_mask
from grpo.rollout import Rollout

CHUNK_POSITIONS = 512   # positions per LM-head chunk: its fp32 (512, V) temporaries are 100 MB for SmolLM2
FORWARD_COST_TOKENS = 32  # a bucket's forward costs about as much as this many more tokens (overhead)


# --------------------------------------------------------------------------- plain reference

def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[target] per position, in fp32. logits (N, C, V), targets (N, C) -> (N, C)."""
    rows = []
    for row_logits, row_targets in zip(logits, targets):           # one sample at a time: (C, V)
        logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)  # (C, V) fp32
        rows.append(logp.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1))  # (C,)
    return torch.stack(rows)                                        # (N, C)


def completion_logprobs_padded(model, ro: Rollout, temperature: float = 1.0) -> Tensor:
    """log π(o_t | ·) at every completion position, from one forward of the padded batch: (N, C).

    The plain implementation: every prompt G times, padding included, (N, C, V) logits.
    """
    C = ro.completion_mask.shape[1]
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                position_ids=position_ids_from_mask(ro.attention_mask), logits_to_keep=C + 1)
    logits = out.logits[:, :-1]                                     # (N, C, V): row t predicts token P+t
    if temperature <= 0:  # greedy sampling has no density; score with the plain softmax
        temperature = 1.0
    return token_logprobs(logits, ro.completion_ids, temperature)  # (N, C)


# --------------------------------------------------------------------------- pure helpers

def length_buckets(lengths: list[int], forward_cost: int = FORWARD_COST_TOKENS) -> list[list[int]]:
    """Cut rows into buckets of similar length, minimising computed positions + overhead.

    Rows are sorted by length; a bucket of consecutive sorted rows i..j is padded to the
    longest, so it computes (j - i + 1)·len_j positions and costs `forward_cost` more (the
    per-forward overhead, in tokens). Dynamic programming over the cut points finds the split
    of least total cost:  cost(j) = min_i cost(i-1) + forward_cost + (j - i + 1)·len_j.
    forward_cost = 0 gives one bucket per distinct length (no padding at all); a huge one
    gives a single bucket. Rows of length 0 are left out. Returns lists of row indices.
    """
    order = sorted((n for n, L in enumerate(lengths) if L > 0), key=lambda n: lengths[n])
    best, cut = [0.0], [0]  # best[j]: least cost of the first j sorted rows; cut[j]: where its last bucket starts
    for j in range(1, len(order) + 1):
        L = lengths[order[j - 1]]
        cost, i = min((best[i] + forward_cost + (j - i) * L, i) for i in range(j))
        best.append(cost)
        cut.append(i)
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def group_micro_batches(group_tokens: list[int], budget: int) -> list[range]:
    """Consecutive groups cut into micro-batches of at most `budget` tokens: ranges of group indices.

    Greedy: a micro-batch takes the next group while its total stays within the budget; a group
    larger than the budget is a micro-batch alone. Every group once, in order.
    """
    out, start, total = [], 0, 0
    for g, tokens in enumerate(group_tokens):
        if g > start and total + tokens > budget:
            out.append(range(start, g))
            start, total = g, 0
        total += tokens
    return out + [range(start, len(group_tokens))] if group_tokens else out


def loss_micro_batches(ro: Rollout, tokens_per_micro_batch: int) -> list[Tensor]:
    """The rollout's rows in micro-batches of whole groups for the loss passes: (n,) row indices each,
    together every row once, in order (`group_micro_batches`).

    A group counts the tokens its loss pass feeds: its prompt once and its G completions (sampled and
    observation tokens), no padding. The memory a pass with gradient keeps for its backward grows with
    that count (SmolLM2, fp32, LoRA: 2.3-3.1 MB per token; benchmarks/PERF.md), so the budget bounds it.
    """
    P = ro.prompt_length
    _, counts = torch.unique_consecutive(ro.group_ids, return_counts=True)            # (B,) rows per group
    group = torch.repeat_interleave(torch.arange(len(counts)), counts.cpu())           # (N,) group of each row
    first = torch.cumsum(counts, 0) - counts                                            # (B,) first row of each group
    completion = ro.attention_mask[:, P:].sum(1).cpu()                                  # (N,)
    tokens = ro.attention_mask[first, :P].sum(1).cpu().index_add(0, group, completion)  # (B,)
    rows = torch.arange(len(group), device=ro.input_ids.device).split(counts.tolist())  # B tensors of rows
    return [torch.cat(rows[r.start:r.stop]) for r in group_micro_batches(tokens.tolist(), tokens_per_micro_batch)]


class SampledLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[y] for logits z (n, V) and targets y (n,): (n,), in fp32 (fp64 for fp64 z).

    Forward:   out_i = z_iy / T - logsumexp_v(z_iv / T)
    Backward:  ∂out_i/∂z_iv = (1[v = y_i] - softmax(z_i / T)_v) / T
    Saved: z as it came (bf16 logits under autocast stay bf16), y and the (n,) logsumexp. Autograd
    through `log_softmax`/`logsumexp` would keep fp32 (n, V) tensors and run a chain of (n, V) ops
    for the backward; here the backward is one fp32 (n, V) copy of z and three in-place passes over
    it (four at T ≠ 1).
    """

    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, temperature: float) -> Tensor:
        zt = z.to(torch.promote_types(z.dtype, torch.float32))                      # (n, V)
        if temperature != 1.0:
            zt = zt / temperature
        lse = torch.logsumexp(zt, dim=-1)                                           # (n,)
        ctx.save_for_backward(z, targets, lse)
        ctx.temperature = temperature
        return zt.gather(-1, targets[:, None]).squeeze(-1) - lse                    # (n,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, targets, lse = ctx.saved_tensors
        T = ctx.temperature
        g = grad / T                                                                # (n,)
        dz = z.to(lse.dtype, copy=True)                                             # (n, V), never z itself
        if T != 1.0:
            dz.div_(T)
        dz.sub_(lse[:, None]).exp_().mul_(-g[:, None])                              # -g·softmax(z / T) / T
        dz.scatter_add_(-1, targets[:, None], g[:, None])                           # + g / T at y
        return dz.to(z.dtype), None, None


def sampled_token_logprobs(head, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                           chunk: int = CHUNK_POSITIONS) -> Tensor:
    """log softmax(head(h) / T)[y] for each row of hidden (M, d) and targets (M,): (M,) fp32.

    Chunks of `chunk` positions bound the fp32 (chunk, V) temporaries; with gradient, each chunk keeps
    its logits head(h) for the backward in the head's output dtype (`SampledLogSoftmax`).
    """
    out = [SampledLogSoftmax.apply(head(hidden[s:s + chunk]), targets[s:s + chunk], temperature)  # (n,)
           for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)  # (M,)


# --------------------------------------------------------------------------- the fast pass

def _decoder_and_head(model):
    """(decoder, LM head) when logits = head(decoder(x)) exactly (Llama, Qwen2, Mistral...), else None."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None and decoder is not model else None


def _prompt_groups(ro: Rollout) -> tuple[Tensor, Tensor]:
    """(first row of each distinct prompt (B,), prompt index of each row (N,)).

    The rollout repeats each prompt G times (rows with the same group id). If the rows of a group
    do not hold the same prompt, every row is its own prompt (still exact, just not shared).
    """
    N, P = ro.input_ids.shape[0], ro.prompt_length
    _, group = torch.unique(ro.group_ids, return_inverse=True)                      # (N,) 0..B-1
    first = torch.full((int(group.max()) + 1,), N, dtype=torch.long).scatter_reduce(
        0, group.cpu(), torch.arange(N), reduce="amin").to(ro.input_ids.device)     # (B,)
    group = group.to(ro.input_ids.device)
    same = (torch.equal(ro.input_ids[:, :P], ro.input_ids[first[group], :P])
            and torch.equal(ro.attention_mask[:, :P], ro.attention_mask[first[group], :P]))
    if not same:
        rows = torch.arange(N, device=ro.input_ids.device)
        return rows, rows
    return first, group


def completion_logprobs(model, ro: Rollout, temperature: float = 1.0, chunk: int = CHUNK_POSITIONS,
                        forward_cost: int = FORWARD_COST_TOKENS) -> Tensor:
    """log π(o_t | q, o_<t) at every sampled completion position of a rollout: (N, C) fp32.

    Positions that are not sampled tokens (observations, padding) get 0; the completion mask
    removes them from the loss. Equal to `completion_logprobs_padded` at sampled positions (values
    and gradients; tests/test_logprobs.py), computing each prompt once per group, no padded
    completion positions, and no (N, C, V) logits (see the module docstring). Models whose logits
    are not head(decoder(x)) fall back to `completion_logprobs_padded`.
    """
    if temperature <= 0:  # greedy sampling has no density; score with the plain softmax
        temperature = 1.0
    parts = _decoder_and_head(model)
    if parts is None:
        return completion_logprobs_padded(model, ro, temperature)
    decoder, head = parts
    from transformers import DynamicCache

    device = ro.input_ids.device
    N, C = ro.completion_mask.shape
    P = ro.prompt_length
    completion_ids = ro.completion_ids                                              # (N, C)
    real = ro.attention_mask[:, P:]                                                 # (N, C) 1 on completion tokens
    lengths = real.sum(1)                                                           # (N,)

    # 1. the B distinct prompts, once (common left padding dropped)
    first, group = _prompt_groups(ro)                                               # (B,), (N,)
    prompt_mask = ro.attention_mask[first, :P]                                      # (B, P)
    start = int((prompt_mask.sum(0) > 0).nonzero()[0]) if P else 0
    prompt_mask = prompt_mask[:, start:]                                            # (B, P')
    prompt_len = prompt_mask.sum(1)                                                 # (B,)
    out = decoder(input_ids=ro.input_ids[first, start:P], attention_mask=prompt_mask,
                  position_ids=position_ids_from_mask(prompt_mask), use_cache=True)
    h_last = out.last_hidden_state[:, -1]                                           # (B, d) predicts completion token 0
    kv = [(layer.keys, layer.values) for layer in out.cache.layers]                 # per layer (B, heads, P', hd)

    # 2. completions in length buckets, each against its prompt's keys/values
    hidden, targets, where = [], [], []
    for rows in length_buckets(lengths.tolist(), forward_cost):
        rows = torch.tensor(rows, device=device)                                    # (n,)
        L = int(lengths[rows].max())
        g = group[rows]                                                             # (n,)
        cache = DynamicCache(ddp_cache_data=[(k.index_select(0, g), v.index_select(0, g)) for k, v in kv])
        ids = completion_ids[rows, :L]                                              # (n, L)
        mask = torch.cat([prompt_mask[g], real[rows, :L]], dim=1)                   # (n, P'+L)
        positions = prompt_len[g][:, None] + torch.arange(L, device=device)         # (n, L)
        h = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True).last_hidden_state                               # (n, L, d)
        states = torch.cat([h_last[g][:, None], h[:, :-1]], dim=1)                  # (n, L, d): [t] predicts token t
        sampled = ro.completion_mask[rows, :L].bool()                               # (n, L)
        hidden.append(states[sampled])                                              # (m, d)
        targets.append(ids[sampled])                                                # (m,)
        where.append((rows[:, None] * C + torch.arange(L, device=device))[sampled])  # (m,) flat index in (N, C)
    if not hidden:
        return torch.zeros(N, C, device=device)

    # 3. log-prob of each sampled token, chunk by chunk, into an (N, C) grid of zeros
    logp = sampled_token_logprobs(head, torch.cat(hidden), torch.cat(targets), temperature, chunk)  # (M,)
    return torch.zeros(N * C, device=device).index_put((torch.cat(where),), logp).view(N, C)  # (N, C)
