"""The batch of the rollout's forwards and its KV cache: which rows are fed, and how their cache moves.

`rollout.py` is the sampling loop; this file is the machinery under its steps 1 (prefill) and 4
(feed). Shapes: see `grpo/__init__.py` (B, G, N, P, L, V); here also R rows in the forward batch
(≤ N), W cached columns, h attention heads, d head size.

Only rows still running are in the KV cache (`KVBatch`): a finished row leaves it (its cache rows
are dropped) and is never fed again. A decode step where every row adds one token is one plain
forward. A step where rows add different numbers of tokens (a tool turn: the sampled token then the
observation) never pads: the rows are split by how many tokens they add, each group goes through
its own forward on its own slice of the cache, and the slices are put back together. Cached columns
that hold no token (left padding of the prompts, a row that waited) are masked out of attention;
positions come from the cumulative attention mask (`position_ids_from_mask`), so these holes do not
shift positions (PITFALLS: "A ragged batch after a tool turn"), and they are squeezed out whenever
the cache is rebuilt (`_squeeze`). The cache grows in place (`GrowingLayer`).

A row is anything with the book-keeping of `grpo.rollout.RowState`: `ids` (its completion so far),
`feed` (the tail of `ids` not yet fed), `held` (a tool turn waiting for a shared forward) and `done`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from grpo.rollout import RowState

# --------------------------------------------------------------------------- masks and padding


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip masked holes: the k-th real token of a row is at position k."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # same shape as the mask


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Rows of ids right-aligned in `width` columns (default: the longest): (ids (n, width), mask (n, width))."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask

# --------------------------------------------------------------------------- the cache


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
            ids, mask = left_pad(seqs, self.pad_id)                                # (R, T)
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

# --------------------------------------------------------------------------- step 1 of the rollout


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
