"""Training order: shuffled or length-grouped, split across processes, resumable mid-epoch.

The order of an epoch is a function of ``(seed, epoch, batch_size)`` alone, over the whole dataset
(the *global* order), never of the number of processes. Step ``k`` consumes the global batch
``order[k*G : (k+1)*G]`` with ``G = batch_size x processes``; process ``r`` takes the ``r``-th
contiguous slice of ``batch_size`` samples of it. So a run on ``W`` processes sees, step by step and
process by process, the micro-batches of one process with the same ``batch_size`` and
``accumulate_grad_batches: W`` (process ``r`` = micro-batch ``r``). The shuffled order also gives one
process with ``batch_size x W`` the same global batches.

:class:`ResumableDataLoader` records how far the epoch got (the fit loop's own batch count, saved in
every checkpoint through Lightning's stateful-loader hook), and a resumed run continues with exactly
the samples not yet seen, in the same order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, cut into mega-batches of ``batch_size * group_size`` samples, sort each by length
    (longest first), then shuffle the order of the resulting batches.

    Deterministic for a given ``seed`` and epoch (:meth:`set_epoch`). :class:`ResumableSampler` uses
    it as the global order with the per-process ``batch_size``, so every process's batch holds samples
    of similar length.
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


class ResumableSampler(DistributedSampler):
    """This process's share of a seeded global order; resumable at any global-batch boundary.

    A :class:`~torch.utils.data.distributed.DistributedSampler` subclass, so Lightning leaves it in
    place instead of wrapping it. With one process it is a plain shuffled (or length-grouped)
    sampler.

    Args:
        dataset: the training dataset (only its length is used).
        batch_size: samples per step and process.
        num_replicas: data-parallel processes.
        rank: this process's data-parallel rank.
        seed: the order of epoch ``e`` is drawn with seed ``seed + e``.
        lengths: sample lengths; when given, the order is length-grouped (:class:`LengthGroupedSampler`).
        group_size: global batches per length-sorted mega-batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group_size: int = 50,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = group_size
        self.start = 0  # global samples of this epoch skipped because a resumed run had seen them
        self._resume: dict[str, int] | None = None
        # the per-epoch length, whatever the resume position (Lightning counts batches from the epoch start)
        full, rest = divmod(self.size, self.global_batch)
        self.num_samples = full * batch_size + math.ceil(rest / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def global_order(self, epoch: int) -> list[int]:
        """Every sample index once, in the order of ``epoch`` (the same on every process)."""
        if self.lengths is not None:
            grouped = LengthGroupedSampler(self.lengths, self.batch_size, group_size=self.group_size, seed=self.seed)
            grouped.set_epoch(epoch)
            return list(grouped)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None  # the saved epoch was finished: start the new one from its beginning
        self.epoch = epoch

    def _local(self, remaining: list[int], order: list[int]) -> list[int]:
        """This rank's slice of every global batch of ``remaining``; a short last batch is padded."""
        mine: list[int] = []
        step, rank = self.global_batch, self.rank
        for start in range(0, len(remaining), step):
            chunk = remaining[start : start + step]
            if len(chunk) < step:  # the last global batch: equal shares, padded from the epoch's start
                share = math.ceil(len(chunk) / self.num_replicas)
                chunk = chunk + order[: share * self.num_replicas - len(chunk)]
                mine += chunk[rank * share : (rank + 1) * share]
            else:
                mine += chunk[rank * self.batch_size : (rank + 1) * self.batch_size]
        return mine

    def __iter__(self) -> Iterator[int]:
        order = self.global_order(self.epoch)
        self.start = 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            self.start = min(self._resume["consumed"], self.size)
        self._resume = None
        return iter(self._local(order[self.start :], order))

    def __len__(self) -> int:
        return self.num_samples

    # ------------------------------------------------------------ state
    def state_dict(self, batches_done: int = 0) -> dict[str, int]:
        """The position after ``batches_done`` steps of the current epoch (global samples consumed)."""
        return {
            "epoch": self.epoch,
            "consumed": min(self.size, batches_done * self.global_batch),
            "global_batch": self.global_batch,
            "size": self.size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: the next iteration of epoch ``state['epoch']`` skips what it consumed."""
        if state["size"] != self.size:
            raise ValueError(
                f"cannot resume the training order: the checkpoint's training split has {state['size']} samples, "
                f"this run's has {self.size}. Use the same data (train, val_fraction, split_seed, max_samples, "
                "max_length) to resume, or start a new run from the weights alone."
            )
        if state["global_batch"] != self.global_batch or state["seed"] != self.seed:
            warnings.warn(
                f"resuming with global batch {self.global_batch} and seed {self.seed}; the checkpoint used "
                f"{state['global_batch']} and {state['seed']}. The run skips the {state['consumed']} samples it "
                "consumed of the saved order, but the epoch no longer matches an uninterrupted run.",
                stacklevel=2,
            )
        if state["consumed"] >= self.size:
            self._resume = None
            self.epoch = state["epoch"] + 1
            return
        self._resume = {"epoch": state["epoch"], "consumed": state["consumed"]}
        self.epoch = state["epoch"]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position survives checkpoints.

    Lightning's fit loop saves ``state_dict()`` of stateful train loaders in every checkpoint and
    calls ``load_state_dict()`` on resume. The position is the fit loop's count of batches started
    in this epoch (``progress``), which, unlike a count of fetched batches, does not run ahead by the
    batches a prefetching iterator holds.

    Args:
        *args, **kwargs: as for ``DataLoader``; ``sampler`` must be a :class:`ResumableSampler`.
        progress: returns the number of batches of the current epoch the training loop has consumed.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict(self.progress() if self.progress is not None else 0)  # type: ignore[union-attr]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.load_state_dict(state_dict)  # type: ignore[union-attr]
