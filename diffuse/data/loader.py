"""Batches for the training loop: an endless, exactly resumable stream of shuffled index batches.

Any dataset with `__len__` and `get_batch(indices, generator) -> (x, y)` works. The order of epoch e is
a permutation drawn from a generator seeded with (seed, e), so the stream's state is just (epoch,
position): a resumed run sees exactly the batches an uninterrupted one would. Under DDP each rank
takes every world_size-th index of the same permutation, so ranks see disjoint data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffuse.devices import to_device
from diffuse.errors import DiffuseError


class BatchStream:
    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        per_rank = len(dataset) // world_size
        if per_rank < batch_size:
            procs = f" × {world_size} processes" if world_size > 1 else ""
            raise DiffuseError(f"trainer.batch_size={batch_size}{procs} is more than the dataset's {len(dataset)} "
                               "items: use a smaller batch")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.position = 0, 0
        self._order: Tensor | None = None
        self._aug = torch.Generator()

    def _epoch_order(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        return perm[self.rank::self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = None
        if self._order is None:
            self._order = self._epoch_order()
        idx = self._order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        # augmentation randomness (e.g. flips) is also a function of (seed, epoch, position, rank)
        self._aug.manual_seed(hash((self.seed, self.epoch, self.position, self.rank)) & 0x7FFF_FFFF)
        self.position += 1
        x, y = self.dataset.get_batch(idx, self._aug)
        return to_device(x, self.device), to_device(y, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None
