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
            self.served = b + 1
            yield self._batch(order, b)
        self.epoch, self.served = self.epoch + 1, 0

    def _batch(self, order: list[int], b: int) -> list[Any]:
        """This rank's b-th batch of the epoch's shared order."""
        k = b * self.world_size + self.rank
        return [self.items[i] for i in order[k * self.batch_size:(k + 1) * self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["served"])
        self.served = self._skip


def check_replay(slots: int, batch_size: int, max_redraws: int) -> None:
    """Refuse redraw settings `ReplayBatches` cannot honour (slots 0 means redraws off)."""
    if not 0 <= slots <= batch_size:
        raise ValueError(f"data.replay_slots={slots}: must be in [0, data.batch_size={batch_size}]")
    if max_redraws < 1:
        raise ValueError(f"data.replay_max_redraws={max_redraws}: must be >= 1")


class ReplayBatches(ResumableBatches):
    """`ResumableBatches` that draws again the questions the trainer asks for.

    After each step the trainer tells the loader, for each prompt of the batch it served last, whether
    to draw that question again (`feedback`; GRPO asks for the questions whose group split between
    searching and answering directly, where the gradient on that choice is largest). Up to `slots` of
    every batch's B prompts are such redraws, first asked first served; the rest are fresh, taken in
    turn from shuffled passes over the items (pass p is `_order(p)`, whatever the epoch). A question is
    drawn again at most `max_redraws` times in a row after a fresh draw.

    The state (fresh draws taken, the queue, the last batch) is saved with the epoch and the batch
    count, so a resumed run draws what an uninterrupted one would. Lightning draws a sized loader's next
    batch after the step (no prefetch), so the feedback of step k reaches batch k + 1. One process only:
    under DDP each rank would queue what it alone saw.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int = 0, slots: int = 1,
                 max_redraws: int = 4, rank: int = 0, world_size: int = 1):
        if world_size != 1:
            raise ValueError(f"data.replay_slots={slots} with {world_size} processes: redraws are decided on "
                             f"one process; train on one device or set data.replay_slots=0")
        if slots == 0:
            raise ValueError("data.replay_slots=0: ReplayBatches needs at least one slot (0 turns redraws off: "
                             "ResumableBatches)")
        check_replay(slots, batch_size, max_redraws)
        super().__init__(items, batch_size, seed)
        self.slots, self.max_redraws = slots, max_redraws
        self.fresh_taken = 0                   # fresh draws so far, over all passes
        self.queue: list[list[int]] = []       # [item index, redraws so far], waiting for a slot
        self.last: list[list[int]] = []        # the same for each prompt of the last batch served
        self._pass: tuple[int, list[int]] = (-1, [])

    def _fresh(self) -> int:
        p, k = divmod(self.fresh_taken, len(self.items))
        if self._pass[0] != p:
            self._pass = (p, self._order(p))
        self.fresh_taken += 1
        return self._pass[1][k]

    def _batch(self, order: list[int], b: int) -> list[Any]:
        """Up to `slots` redraws from the queue, then fresh draws (the epoch's order is not used)."""
        redraws, self.queue = self.queue[:self.slots], self.queue[self.slots:]
        self.last = redraws + [[self._fresh(), 0] for _ in range(self.batch_size - len(redraws))]
        return [self.items[i] for i, _ in self.last]

    @property
    def redrawn(self) -> int:
        """How many prompts of the last batch were redraws."""
        return sum(r > 0 for _, r in self.last)

    def feedback(self, again: Sequence[bool]) -> None:
        """Queue for another draw each prompt of the last batch whose `again` is true (B flags, in the
        batch's order), unless it was already drawn `max_redraws` times in a row."""
        if len(again) != len(self.last):
            raise ValueError(f"feedback for {len(again)} prompts, but the last batch had {len(self.last)}")
        self.queue += [[i, r + 1] for (i, r), a in zip(self.last, again) if a and r < self.max_redraws]

    def state_dict(self) -> dict:
        return super().state_dict() | {"fresh_taken": self.fresh_taken, "queue": [list(q) for q in self.queue],
                                       "last": [list(q) for q in self.last]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fresh_taken = int(state["fresh_taken"])
        self.queue, self.last = [list(q) for q in state["queue"]], [list(q) for q in state["last"]]
