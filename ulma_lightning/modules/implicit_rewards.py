"""Accuracy and AUC of an implicit reward at separating positives from negatives, per epoch over all
processes: the ``rewards/accuracy`` and ``rewards/auc`` of the point-wise modules and of KTO
(:class:`RewardMetrics`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_accuracy, binary_auroc
from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

import ulma_lightning._compat as _compat
from ulma_lightning.losses import LabelType

if TYPE_CHECKING:
    import lightning.pytorch as pl

Stage = Literal["train", "val", "test"]


class RewardMetrics:
    """How well an implicit reward separates positives, kept for a module (composed, not inherited).

    The module's step passes each batch's values to :meth:`record`: ``probability`` (the reward
    mapped to ``(0, 1)``; above 0.5 reads as positive), the binary target, the reward itself and the
    score. The batch accuracy is logged per training step (``train/rewards/accuracy_step``); the epoch
    values (``{stage}/rewards/accuracy``, and ``{stage}/rewards/auc`` when the epoch holds both classes:
    AUC is an epoch metric, a batch may hold one class) at the epoch's end, over every process's
    batches (:meth:`log_epoch`). For continuous labels, in validation and test, also the Pearson
    and Spearman correlation of the reward with the score (``{stage}/rewards/pearson``, ``/spearman``).
    """

    def __init__(self) -> None:
        #: per stage: (probability, binary target, reward, score) of the batches that count
        self.outputs: dict[str, list[tuple[Tensor, ...]]] = {"train": [], "val": [], "test": []}

    def record(
        self,
        module: pl.LightningModule,
        probability: Tensor,
        positive: Tensor,
        reward: Tensor,
        scores: Tensor,
        stage: Stage,
    ) -> None:
        """Keep a batch's values for the epoch metrics; log its accuracy in training."""
        probability, target = probability.detach().float(), positive.long()
        self.outputs[stage].append((probability, target, reward.detach().float(), scores.detach().float()))
        if stage == "train":
            accuracy = ((probability > 0.5).long() == target).float().mean()
            module.log(
                "train/rewards/accuracy_step", accuracy, on_step=True, on_epoch=False, batch_size=int(target.numel())
            )

    def log_epoch(self, module: pl.LightningModule, stage: Stage, label_type: LabelType | None) -> None:
        """Log the epoch's reward metrics over the batches of all processes, then reset them.

        Which batches count differs between processes (and a collective must not), so the values
        are gathered in uneven sizes on every process at every epoch end, rather than synced
        metric by metric.
        """
        outputs, self.outputs[stage] = self.outputs[stage], []
        dtypes = (torch.float32, torch.long, torch.float32, torch.float32)  # the same on every process
        columns = (
            [torch.cat(c) for c in zip(*outputs)]
            if outputs
            else [torch.zeros(0, dtype=d, device=module.device) for d in dtypes]
        )
        probability, target, reward, score = (gather_uneven(module, c.to(d)) for c, d in zip(columns, dtypes))
        if not target.numel():
            return
        suffix = "_epoch" if stage == "train" else ""
        # the values are already global: sync_dist averages equal values (and keeps Lightning quiet)
        module.log(f"{stage}/rewards/accuracy{suffix}", binary_accuracy(probability, target), sync_dist=True)
        if bool((target == 0).any()) and bool(
            (target == 1).any()
        ):  # AUC needs both classes (torchmetrics would return 0 and warn)
            module.log(f"{stage}/rewards/auc{suffix}", binary_auroc(probability, target), sync_dist=True)
        if label_type == "continuous" and stage != "train" and target.numel() > 1:
            module.log(f"{stage}/rewards/pearson", pearson_corrcoef(reward, score), sync_dist=True)
            module.log(f"{stage}/rewards/spearman", spearman_corrcoef(reward, score), sync_dist=True)


def gather_uneven(module: pl.LightningModule, values: Tensor) -> Tensor:
    """``values`` of every process, concatenated (sizes may differ between processes)."""
    if _compat.attached_trainer(module) is None or module.trainer.world_size == 1:
        return values
    size = torch.tensor([values.numel()], device=module.device)
    sizes = module.all_gather(size).view(-1).tolist()
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=module.device)
    padded[: values.numel()] = values
    gathered = module.all_gather(padded).view(len(sizes), -1)
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(sizes)])
