"""Point-wise DPO, and :class:`PointwiseModule`, the base of a point-wise loss of your own."""

from __future__ import annotations

from typing import get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, Reduction, pointwise_dpo_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig

__all__ = ["PointwiseDPOModule", "PointwiseModule", "check_label_options", "check_pointwise_options"]


def check_pointwise_options(*, beta: float, positive_threshold: float, reduction: str) -> None:
    """Reject bad point-wise options at construction, before any model is built."""
    check_numbers(beta=(beta, "> 0"))
    if not 0 < positive_threshold <= 1:
        raise ValueError(
            f"positive_threshold must be in (0, 1], got {positive_threshold}: scores are normalised to [0, 1] by "
            "data.score_range (e.g. 4 on a 1..5 scale is 0.75)"
        )
    check_choices(reduction=(reduction, get_args(Reduction)))


def check_label_options(*, label_type: str, continuous_form: str) -> None:
    """Reject a bad ``label_type`` or ``continuous_form`` (the options of the point-wise DPO family)."""
    check_choices(
        label_type=(label_type, get_args(LabelType)), continuous_form=(continuous_form, get_args(ContinuousForm))
    )


#: a point-wise method's declaration: reference on every row, per-token means, reward metrics
POINTWISE = MethodSpec(average_logps=True, label_type="binary", reward_metrics=True)


class PointwiseModule(AlignmentModule):
    """The base of a point-wise loss of your own: the point-wise options, a declaration
    (:attr:`spec`) and one method, :meth:`loss` (docs/extending.md).

    The step (:meth:`~ulma_lightning.modules.base.AlignmentModule.compute_loss`) computes the policy's
    and the reference's sequence log-probs of each sample, on the rows ``spec.reference`` names, calls
    :meth:`loss` and logs its metrics and the implicit reward's accuracy and AUC. Labels are binary
    (the data module refuses scores other than 0 and 1) unless the declaration says ``continuous``.

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

    spec = POINTWISE

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
        check_pointwise_options(beta=beta, positive_threshold=positive_threshold, reduction=reduction)
        super().__init__(policy, optimizer)
        self.beta, self.offset, self.reduction, self.positive_threshold = beta, offset, reduction, positive_threshold

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:  # type: ignore[override]
        """The objective from per-sequence log-probs, each ``(B,)``; ``reference_logps`` is NaN on the
        rows the declaration skips."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(policy_logps, reference_logps, scores)")


class PointwiseDPOModule(AlignmentModule):
    """Point-wise DPO (ULMA paper, section 3): ``-[z log sigma(u) + (1 - z) log(1 - sigma(u))]``.

    Needs reference log-probs on every sample.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength (the paper's beta).
        offset: added to ``beta * h``; stands for ``beta * log Z(x)`` (the authors' ``constant_zx``).
        reduction: ``subset_mean`` (mean over positives + mean over negatives, the authors' code) or
            ``mean`` (mean over samples).
        average_logps: per-token mean sequence log-probs (True, the authors' code) or sums.
        positive_threshold: a score at or above it marks a positive sample.
        label_type: ``binary`` (scores in {0, 1}) or ``continuous`` (scores in [0, 1]).
        continuous_form: for continuous labels, ``bce`` (soft-label cross-entropy) or ``mse``
            (the authors' ``(z - u)^2``).
    """

    spec = POINTWISE

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        label_type: LabelType = "binary",
        continuous_form: ContinuousForm = "bce",
        beta: float = 0.1,
        offset: float = 0.0,
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        positive_threshold: float = 1.0,
    ) -> None:
        check_pointwise_options(beta=beta, positive_threshold=positive_threshold, reduction=reduction)
        check_label_options(label_type=label_type, continuous_form=continuous_form)
        super().__init__(policy, optimizer)
        self.beta, self.offset, self.reduction, self.positive_threshold = beta, offset, reduction, positive_threshold
        self.continuous_form = continuous_form

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:  # type: ignore[override]
        return pointwise_dpo_loss(
            policy_logps, reference_logps, scores, beta=self.beta, offset=self.offset, label_type=self.label_type,  # type: ignore[arg-type]
            continuous_form=self.continuous_form, reduction=self.reduction, positive_threshold=self.positive_threshold,
        )  # fmt: skip
