"""Which samples each training step takes: a pure function of ``(seed, step)``.

The batches of step ``i`` depend only on ``(seed, i)``, so a run resumed from a checkpoint sees
exactly the batches the uninterrupted run would have seen, and under ``torchrun`` rank ``r`` of
``w`` takes the ``r``-th slice of the same global batch a single process would take.

Examples:
    >>> sampler = StepBatchSampler(5, batch_size=2, steps=3)
    >>> list(sampler)
    [[0, 1], [2, 3], [4, 5]]
    >>> list(StepBatchSampler(5, 2, steps=3, start_step=2)) == list(sampler)[2:]
    True
    >>> stream = EpochStream(list("abc"), seed=0)
    >>> sorted(stream[p] for p in range(3)) == sorted(stream[p] for p in range(3, 6))
    True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from clstm4d.errors import UserError

__all__ = ["EpochStream", "StepBatchSampler"]


class StepBatchSampler(Sampler):
    """Batches of sample positions, step by step: step ``i`` of rank ``r`` gets positions
    ``[(i*w + r)*B, (i*w + r + 1)*B)`` of an endless stream, so the global batch of a step
    is the same for any number of ranks and for a resumed run.

    Args:
        length: unused positions are fine; kept for ``len(dataset)`` checks (must be >= 1).
        batch_size: ``B``, samples per step on this rank.
        steps: the last step (exclusive).
        seed: kept for symmetry with :class:`EpochStream` (which owns the randomness).
        start_step: the first step yielded (for resuming).
        rank, world_size: this process's slice of the global batch.
    """

    def __init__(self, length: int, batch_size: int, steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if length < 1:
            raise UserError("the training dataset is empty")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.steps = batch_size, steps
        self.start_step, self.rank, self.world = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        glob = self.batch_size * self.world
        for step in range(self.start_step, self.steps):
            first = step * glob + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


class EpochStream(torch.utils.data.Dataset):
    """An endless stream over a map-style dataset: position ``p`` is item
    ``perm_e[p mod len]`` of epoch ``e = p // len``, with one random permutation per epoch
    seeded from ``(seed, e)``; datasets with ``set_epoch`` (``PatchDataset``) are told the
    epoch, so they draw new crops each epoch. A pure function of the position: works the same
    in DataLoader workers, on every rank and after a resume.
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.length = len(dataset)
        self._epoch, self._perm = -1, []

    def __len__(self) -> int:  # not used by the batch sampler; positions are unbounded
        return self.length

    def __getitem__(self, position: int):
        epoch, i = divmod(int(position), self.length)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.length, generator=g).tolist()
            self._epoch = epoch
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
        return self.dataset[self._perm[i]]
