"""ULMA: SFT on positive demonstrations and point-wise DPO on negatives, in one step."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, PositiveTerm, ulma_loss
from ulma_lightning.modules.base import OptimizerConfig, Stage
from ulma_lightning.modules.pointwise import PointwiseModule, check_label_options
from ulma_lightning.policy import PolicyConfig


class ULMAModule(PointwiseModule):
    """Unified Language Model Alignment (Cai et al. 2023, eq. 9).

    Positives get ``positive_term`` (plain SFT by default); the rest get the KL-regularised
    point-wise DPO negative term. With ``positive_term: sft`` the reference model runs on negatives
    only during training; in validation and test it runs on every row when
    ``eval_reference_on_positives`` is set, so that the reward accuracy and AUC cover both classes.

    See :class:`~ulma_lightning.modules.pointwise.PointwiseModule` for the other arguments (``beta``,
    ``offset``, ``reduction``, ``average_logps``, ``positive_threshold``).

    Args:
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
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, optimizer, **kwargs)
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
