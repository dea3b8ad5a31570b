"""Point-wise preference modules: shared step for point-wise DPO and ULMA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, Reduction, pointwise_dpo_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.policy import PolicyConfig


class PointwiseModule(AlignmentModule):
    """Shared step of the point-wise methods: log-probs in, :meth:`loss` out, reward metrics logged.

    A subclass changes the objective by overriding :meth:`loss` alone, and chooses the rows that need
    a reference forward with :meth:`reference_rows`.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength (the paper's beta).
        offset: added to ``beta * h``; stands for ``beta * log Z(x)`` (the authors' ``constant_zx``).
        label_type: ``binary`` (scores in {0, 1}) or ``continuous`` (scores in [0, 1]).
        continuous_form: for continuous labels, ``bce`` (soft-label cross-entropy) or ``mse``
            (the authors' ``(z - u)^2``).
        reduction: ``subset_mean`` (mean over positives + mean over negatives, the authors' code) or
            ``mean`` (mean over samples).
        average_logps: per-token mean sequence log-probs (True, the authors' code) or sums.
        positive_threshold: a score at or above it marks a positive sample.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.1,
        offset: float = 0.0,
        label_type: LabelType = "binary",
        continuous_form: ContinuousForm = "bce",
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        positive_threshold: float = 1.0,
    ) -> None:
        super().__init__(policy, optimizer)
        self.beta = beta
        self.offset = offset
        self.label_type = label_type
        self.continuous_form = continuous_form
        self.reduction = reduction
        self.positive_threshold = positive_threshold
        self.reward_metrics = nn.ModuleDict(
            {f"{stage}_{name}": cls() for stage in ("train", "val", "test") for name, cls in (("accuracy", BinaryAccuracy), ("auc", BinaryAUROC))}
        )
        if label_type == "continuous":
            for stage in ("val", "test"):
                self.reward_metrics[f"{stage}_pearson"] = PearsonCorrCoef()
                self.reward_metrics[f"{stage}_spearman"] = SpearmanCorrCoef()

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        """The objective from per-sequence log-probs; override this to try a new loss."""
        raise NotImplementedError

    def reference_rows(self, scores: Tensor, stage: Stage) -> Tensor | None:
        """Rows that need a reference forward (None: all)."""
        return None

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        scores = batch["score"]
        policy_logps = self.policy.logps(batch, average=self.average_logps)
        reference_logps = self.policy.reference_logps(batch, average=self.average_logps, rows=self.reference_rows(scores, stage))
        out = self.loss(policy_logps, reference_logps, scores)
        self.update_reward_metrics(policy_logps, reference_logps, scores, stage)
        return out

    def update_reward_metrics(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, stage: Stage) -> None:
        """Accuracy and AUC of the implicit reward ``beta * h + offset`` at separating positives; for
        continuous labels, in validation and test, also the Pearson and Spearman correlation of
        ``beta * h`` with the label (``{stage}/rewards/pearson``, ``{stage}/rewards/spearman``).

        Skipped for batches where the reference ran on some rows only (ULMA training with an SFT
        positive term); AUC is an epoch metric (a batch may hold one class).
        """
        if bool(reference_logps.isnan().any()):
            return  # the reference skipped some rows (ULMA training): the metrics would be biased
        margin = (self.beta * (policy_logps - reference_logps) + self.offset).detach()
        target = (scores >= self.positive_threshold).long()
        accuracy = self.reward_metrics[f"{stage}_accuracy"]
        auc = self.reward_metrics[f"{stage}_auc"]
        probability = torch.sigmoid(margin)
        accuracy(probability, target)  # forward: updates the epoch state and caches the step value
        auc.update(probability, target)
        size = int(target.numel())
        self.log(f"{stage}/rewards/accuracy", accuracy, on_step=stage == "train", on_epoch=True, batch_size=size)
        self.log(f"{stage}/rewards/auc", auc, on_step=False, on_epoch=True, batch_size=size)
        if f"{stage}_pearson" in self.reward_metrics:
            reward = (self.beta * (policy_logps - reference_logps)).detach().float()
            for name in ("pearson", "spearman"):
                metric = self.reward_metrics[f"{stage}_{name}"]
                metric.update(reward, scores.float())
                self.log(f"{stage}/rewards/{name}", metric, on_step=False, on_epoch=True, batch_size=size)

    def loss_kwargs(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "offset": self.offset,
            "label_type": self.label_type,
            "continuous_form": self.continuous_form,
            "reduction": self.reduction,
        }


class PointwiseDPOModule(PointwiseModule):
    """Point-wise DPO (ULMA paper, section 3): ``-[z log sigma(u) + (1 - z) log(1 - sigma(u))]``.

    Needs reference log-probs on every sample. See :class:`PointwiseModule` for the arguments.
    """

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        return pointwise_dpo_loss(policy_logps, reference_logps, scores, **self.loss_kwargs())
