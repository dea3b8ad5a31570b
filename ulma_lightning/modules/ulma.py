"""ULMA: SFT on positive demonstrations and point-wise DPO on negatives, in one step."""

from __future__ import annotations

from torch import Tensor

from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, PositiveTerm, Reduction, ulma_loss
from ulma_lightning.modules.base import OptimizerConfig, Stage
from ulma_lightning.modules.pointwise import PointwiseModule, check_choices, check_label_options
from ulma_lightning.policy import PolicyConfig


class ULMAModule(PointwiseModule):
    """Unified Language Model Alignment (Cai et al. 2023, eq. 9).

    Positives get ``positive_term`` (plain SFT by default); the rest get the KL-regularised
    point-wise DPO negative term. With ``positive_term: sft`` the reference model runs on negatives
    only during training; in validation and test it runs on every row when
    ``eval_reference_on_positives`` is set, so that the reward accuracy and AUC cover both classes.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength.
        offset: added to ``beta * h``; the authors' ``constant_zx``.
        positive_term: ``sft`` (-log pi), ``beta_sft`` (-beta log pi) or ``pointwise_dpo``.
        positive_threshold: a score at or above it marks a positive (demonstration).
        label_type: ``binary`` or ``continuous``.
        continuous_form: ``bce`` or ``mse`` (the authors' regression), for continuous labels.
        reduction: ``subset_mean`` (the authors') or ``mean``.
        average_logps: per-token mean sequence log-probs (True, the authors' code) or sums.
        eval_reference_on_positives: run the reference on positives too in validation/test.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.1,
        offset: float = 0.0,
        positive_term: PositiveTerm = "sft",
        positive_threshold: float = 1.0,
        label_type: LabelType = "binary",
        continuous_form: ContinuousForm = "bce",
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        eval_reference_on_positives: bool = True,
    ) -> None:
        super().__init__(
            policy,
            optimizer,
            beta=beta,
            offset=offset,
            reduction=reduction,
            average_logps=average_logps,
            positive_threshold=positive_threshold,
        )
        check_label_options(label_type=label_type, continuous_form=continuous_form)
        check_choices(positive_term=(positive_term, ("sft", "beta_sft", "pointwise_dpo")))
        self.label_type = label_type
        self.continuous_form = continuous_form
        self.positive_term = positive_term
        self.eval_reference_on_positives = eval_reference_on_positives

    def reference_rows(self, scores: Tensor, stage: Stage) -> Tensor | None:
        if self.positive_term == "pointwise_dpo" or (stage != "train" and self.eval_reference_on_positives):
            return None
        return scores < self.positive_threshold

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        return ulma_loss(
            policy_logps,
            reference_logps,
            scores,
            positive_term=self.positive_term,
            positive_threshold=self.positive_threshold,
            label_type=self.label_type,
            continuous_form=self.continuous_form,
            **self.loss_kwargs(),
        )
