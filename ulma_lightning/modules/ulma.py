"""ULMA: SFT on positive demonstrations and point-wise DPO on negatives, in one step."""

from __future__ import annotations

from typing import get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, PositiveTerm, Reduction, ulma_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig
from ulma_lightning.modules.pointwise import POINTWISE, check_label_options, check_pointwise_options
from ulma_lightning.policy import PolicyConfig


class ULMAModule(AlignmentModule):
    """Unified Language Model Alignment (Cai et al. 2023, eq. 9).

    Positives get ``positive_term`` (plain SFT by default); the rest get the KL-regularised
    point-wise DPO negative term. With ``positive_term: sft`` the reference model runs on negatives
    only during training; in validation and test it runs on every row when
    ``eval_reference_on_positives`` is set, so that the reward accuracy and AUC cover both classes.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength (the paper's beta).
        offset: added to ``beta * h``; stands for ``beta * log Z(x)`` (the authors' ``constant_zx``).
        reduction: ``subset_mean`` (mean over positives + mean over negatives, the authors' code) or
            ``mean`` (mean over samples).
        average_logps: per-token mean sequence log-probs (True, the authors' code) or sums.
        positive_threshold: a score at or above it marks a positive sample.
        positive_term: ``sft`` (-log pi), ``beta_sft`` (-beta log pi) or ``pointwise_dpo``.
        label_type: ``binary`` or ``continuous``.
        continuous_form: ``bce`` or ``mse`` (the authors' regression), for continuous labels.
        eval_reference_on_positives: run the reference on positives too in validation/test.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        positive_term: PositiveTerm = "sft",
        label_type: LabelType = "binary",
        continuous_form: ContinuousForm = "bce",
        eval_reference_on_positives: bool = True,
        beta: float = 0.1,
        offset: float = 0.0,
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        positive_threshold: float = 1.0,
    ) -> None:
        check_pointwise_options(beta=beta, positive_threshold=positive_threshold, reduction=reduction)
        check_label_options(label_type=label_type, continuous_form=continuous_form)
        check_choices(positive_term=(positive_term, get_args(PositiveTerm)))
        every_row = positive_term == "pointwise_dpo"  # the others need no reference on positives
        spec = POINTWISE.replace(
            reference="all" if every_row else "negatives",
            eval_reference="all" if every_row or eval_reference_on_positives else "negatives",
        )
        super().__init__(policy, optimizer, spec)
        self.beta, self.offset, self.reduction, self.positive_threshold = beta, offset, reduction, positive_threshold
        self.positive_term, self.continuous_form = positive_term, continuous_form
        self.eval_reference_on_positives = eval_reference_on_positives

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:  # type: ignore[override]
        return ulma_loss(
            policy_logps, reference_logps, scores, beta=self.beta, offset=self.offset, positive_term=self.positive_term,
            positive_threshold=self.positive_threshold,
            label_type=self.label_type, continuous_form=self.continuous_form,  # type: ignore[arg-type]
            reduction=self.reduction,
        )  # fmt: skip
