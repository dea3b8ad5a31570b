"""Point-wise preference modules: shared step for point-wise DPO and ULMA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, Reduction, pointwise_dpo_loss
from ulma_lightning.modules.base import OptimizerConfig, Stage
from ulma_lightning.modules.implicit_rewards import RewardMetricsModule
from ulma_lightning.policy import PolicyConfig


def check_pointwise_options(*, beta: float, positive_threshold: float, reduction: str) -> None:
    """Reject bad point-wise options at construction, before any model is built."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 < positive_threshold <= 1:
        raise ValueError(f"positive_threshold must be in (0, 1], got {positive_threshold}: scores are normalised to [0, 1] by data.score_range (e.g. 4 on a 1..5 scale is 0.75)")
    check_choices(reduction=(reduction, ("subset_mean", "mean")))


def check_label_options(*, label_type: str, continuous_form: str) -> None:
    """Reject a bad ``label_type`` or ``continuous_form`` (the options of the point-wise DPO family)."""
    check_choices(label_type=(label_type, ("binary", "continuous")), continuous_form=(continuous_form, ("bce", "mse")))


class PointwiseModule(RewardMetricsModule):
    """Shared step of the point-wise methods: log-probs in, :meth:`loss` out, reward metrics logged.

    A subclass changes the objective by overriding :meth:`loss` alone (build its result with
    :func:`~ulma_lightning.losses.pointwise_output`), and chooses the rows that need a reference
    forward with :meth:`reference_rows`. A subclass that adds constructor arguments takes the
    parent's as ``**kwargs`` and passes them on, so a config's options for the parent still apply
    (docs/extending.md).

    Options only some losses use live on the modules that use them: ``label_type`` and
    ``continuous_form`` are arguments of :class:`PointwiseDPOModule` and
    :class:`~ulma_lightning.ULMAModule`; here :attr:`label_type` is ``binary`` (the data module
    refuses scores other than 0 and 1 for it).

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength (the paper's beta).
        offset: added to ``beta * h``; stands for ``beta * log Z(x)`` (the authors' ``constant_zx``).
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
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        positive_threshold: float = 1.0,
    ) -> None:
        super().__init__(policy, optimizer)
        self.beta = beta
        self.offset = offset
        self.reduction = reduction
        self.positive_threshold = positive_threshold
        check_pointwise_options(beta=beta, positive_threshold=positive_threshold, reduction=reduction)

    #: the labels' kind: ``binary`` (scores in {0, 1}, checked by the data module) or ``continuous``.
    label_type: LabelType = "binary"

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        """The objective from per-sequence log-probs; override this to try a new loss."""
        raise NotImplementedError

    def reference_rows(self, scores: Tensor, stage: Stage) -> Tensor | None:
        """Rows that need a reference forward (None: all)."""
        return None

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        scores = batch["score"]
        rows = self.reference_rows(scores, stage)
        policy_logps = self.policy.logps(batch, average=self.average_logps)
        reference_logps = self.policy.reference_logps(batch, average=self.average_logps, rows=rows)
        out = self.loss(policy_logps, reference_logps, scores)
        if rows is not None:  # the positives' reward is undefined in this stage, whatever the batch holds:
            out.metrics.pop("rewards/positive", None)  # never logged (the same metrics on every process)
        self.update_reward_metrics(policy_logps, reference_logps, scores, stage)
        return out

    def update_reward_metrics(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, stage: Stage) -> None:
        """Record the implicit reward ``beta * h + offset`` of a batch for the reward metrics
        (:class:`~ulma_lightning.modules.implicit_rewards.RewardMetricsModule`); for continuous labels, in
        validation and test, also the Pearson and Spearman correlation of ``beta * h`` with the label
        (``{stage}/rewards/pearson``, ``{stage}/rewards/spearman``).

        Skipped for batches where the reference ran on some rows only (ULMA training with an SFT
        positive term): the metrics would be biased.
        """
        if bool(reference_logps.isnan().any()):
            return
        reward = (self.beta * (policy_logps - reference_logps)).detach().float()
        self.record_rewards(torch.sigmoid(reward + self.offset), scores >= self.positive_threshold, reward, scores, stage)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword options of this module's loss function."""
        return {"beta": self.beta, "offset": self.offset, "reduction": self.reduction}


class PointwiseDPOModule(PointwiseModule):
    """Point-wise DPO (ULMA paper, section 3): ``-[z log sigma(u) + (1 - z) log(1 - sigma(u))]``.

    Needs reference log-probs on every sample. See :class:`PointwiseModule` for the other arguments.

    Args:
        label_type: ``binary`` (scores in {0, 1}) or ``continuous`` (scores in [0, 1]).
        continuous_form: for continuous labels, ``bce`` (soft-label cross-entropy) or ``mse``
            (the authors' ``(z - u)^2``).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        label_type: LabelType = "binary",
        continuous_form: ContinuousForm = "bce",
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, optimizer, **kwargs)
        check_label_options(label_type=label_type, continuous_form=continuous_form)
        self.label_type = label_type
        self.continuous_form = continuous_form

    def loss_kwargs(self) -> dict[str, Any]:
        return {**super().loss_kwargs(), "label_type": self.label_type, "continuous_form": self.continuous_form}

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        return pointwise_dpo_loss(policy_logps, reference_logps, scores, positive_threshold=self.positive_threshold, **self.loss_kwargs())
