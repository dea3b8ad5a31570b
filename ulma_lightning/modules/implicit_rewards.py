"""Accuracy and AUC of an implicit reward at separating positives from negatives, per epoch over all
processes: the ``rewards/accuracy`` and ``rewards/auc`` of the point-wise modules and of KTO."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_accuracy, binary_auroc
from torchmetrics.functional.regression import pearson_corrcoef, spearman_corrcoef

import ulma_lightning._compat as _compat
from ulma_lightning.losses import LabelType
from ulma_lightning.modules.base import AlignmentModule, Stage


class RewardMetricsModule(AlignmentModule):
    """An :class:`AlignmentModule` that logs how well an implicit reward separates positives.

    A subclass passes each batch's values to :meth:`record_rewards`: ``probability`` (the reward
    mapped to ``(0, 1)``; above 0.5 reads as positive), the binary target, the reward itself and the
    score. The batch accuracy is logged per training step (``train/rewards/accuracy_step``); the epoch
    values (``{stage}/rewards/accuracy``, and ``{stage}/rewards/auc`` when the epoch holds both classes:
    AUC is an epoch metric, a batch may hold one class) at the epoch's end, over every process's
    batches (:meth:`log_reward_metrics`). For continuous labels, in validation and test, also the Pearson
    and Spearman correlation of the reward with the score (``{stage}/rewards/pearson``, ``/spearman``).
    """

    #: the labels' kind: ``binary`` (scores in {0, 1}, checked by the data module) or ``continuous``.
    label_type: LabelType = "binary"

    @property
    def _reward_outputs(self) -> dict[str, list[tuple[Tensor, ...]]]:
        """Per stage: (probability, binary target, reward, score) of the batches that count (made on
        first use: no ``__init__`` here, so the subclasses' hyperparameters stay their own)."""
        if "_reward_store" not in self.__dict__:
            self.__dict__["_reward_store"] = {"train": [], "val": [], "test": []}
        return self.__dict__["_reward_store"]

    def record_rewards(self, probability: Tensor, positive: Tensor, reward: Tensor, scores: Tensor, stage: Stage) -> None:
        """Keep a batch's values for the epoch metrics; log its accuracy in training."""
        probability, target = probability.detach().float(), positive.long()
        self._reward_outputs[stage].append((probability, target, reward.detach().float(), scores.detach().float()))
        if stage == "train":
            accuracy = ((probability > 0.5).long() == target).float().mean()
            self.log("train/rewards/accuracy_step", accuracy, on_step=True, on_epoch=False, batch_size=int(target.numel()))

    def log_reward_metrics(self, stage: Stage) -> None:
        """Log the epoch's reward metrics over the batches of all processes, then reset them.

        Which batches count differs between processes (and a collective must not), so the values
        are gathered in uneven sizes on every process at every epoch end, rather than synced
        metric by metric.
        """
        outputs = self._reward_outputs[stage]
        self._reward_outputs[stage] = []
        dtypes = (torch.float32, torch.long, torch.float32, torch.float32)  # the same on every process
        columns = [torch.cat(c) for c in zip(*outputs)] if outputs else [torch.zeros(0, dtype=d, device=self.device) for d in dtypes]
        probability, target, reward, score = (self._gather_uneven(c.to(d)) for c, d in zip(columns, dtypes))
        if not target.numel():
            return
        suffix = "_epoch" if stage == "train" else ""
        # the values are already global: sync_dist averages equal values (and keeps Lightning quiet)
        self.log(f"{stage}/rewards/accuracy{suffix}", binary_accuracy(probability, target), sync_dist=True)
        if bool((target == 0).any()) and bool((target == 1).any()):  # AUC needs both classes (torchmetrics would return 0 and warn)
            self.log(f"{stage}/rewards/auc{suffix}", binary_auroc(probability, target), sync_dist=True)
        if self.label_type == "continuous" and stage != "train" and target.numel() > 1:
            self.log(f"{stage}/rewards/pearson", pearson_corrcoef(reward, score), sync_dist=True)
            self.log(f"{stage}/rewards/spearman", spearman_corrcoef(reward, score), sync_dist=True)

    def _gather_uneven(self, values: Tensor) -> Tensor:
        """``values`` of every process, concatenated (sizes may differ between processes)."""
        if _compat.attached_trainer(self) is None or self.trainer.world_size == 1:
            return values
        size = torch.tensor([values.numel()], device=self.device)
        sizes = self.all_gather(size).view(-1).tolist()
        padded = torch.zeros(max(sizes), dtype=values.dtype, device=self.device)
        padded[: values.numel()] = values
        gathered = self.all_gather(padded).view(len(sizes), -1)
        return torch.cat([gathered[rank, :n] for rank, n in enumerate(sizes)])

    def on_train_epoch_end(self) -> None:
        self.log_reward_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.log_reward_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_reward_metrics("test")
