"""A batch loader that Lightning can resume mid-epoch, exactly.

Lightning restores a training dataloader mid-epoch only if it has `state_dict` and
`load_state_dict` (its `_Stateful` protocol); a plain shuffled `DataLoader` replays the epoch
from its start on resume, so "2 steps + resume + 2 steps" would differ from "4 steps".
Here the order of epoch e is a permutation seeded by (seed, e), and the state is (epoch,
batches served), so a resumed run sees exactly the batches an uninterrupted one would.
Under DDP every rank takes every world_size-th batch of the same order: a batch (a group of
B prompts) is never split across ranks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class ResumableBatches:
    def __init__(self, items: Sequence[Any], batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or batch_size * world_size > len(items):
            raise ValueError(f"data.batch_size={batch_size} x world_size={world_size} does not fit the "
                             f"{len(items)} training items: every rank needs a full batch each step")
        self.items, self.batch_size, self.seed, self.shuffle = list(items), batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.served = 0   # batches of the current epoch already yielded (this rank)
        self._skip = 0    # set by load_state_dict: batches to skip at the next __iter__

    def __len__(self) -> int:
        return len(self.items) // self.batch_size // self.world_size

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def __iter__(self):
        order, start = self._order(self.epoch), self._skip
        self._skip = 0
        for b in range(start, len(self)):
            k = b * self.world_size + self.rank  # this rank's b-th batch of the shared order
            self.served = b + 1
            yield [self.items[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]
        self.epoch, self.served = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["served"])
        self.served = self._skip
