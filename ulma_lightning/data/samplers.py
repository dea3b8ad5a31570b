"""Length-grouped sampling: batches of similar length, to cut padding, still shuffled."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, cut into mega-batches of ``batch_size * group_size`` samples, sort each by length
    (longest first), then shuffle the order of the resulting batches.

    Deterministic for a given ``seed`` and epoch (:meth:`set_epoch`). Under DDP, Lightning wraps it
    in a distributed sampler that splits its order across ranks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, group_size: int = 50, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.group_size
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]
