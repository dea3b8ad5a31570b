"""Unlikelihood training on point-wise feedback: likelihood on positives, unlikelihood on negatives."""

from __future__ import annotations

from typing import get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import LossOutput, UnlikelihoodReduction, UnlikelihoodVariant, unlikelihood_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig


class UnlikelihoodModule(AlignmentModule):
    """Unlikelihood training on :class:`~ulma_lightning.PointwiseDataModule` data (no reference model).

    Two objectives (see :func:`~ulma_lightning.losses.unlikelihood_loss`):

    * ``variant: welleck`` (default; Welleck et al. 2019): token level, ``-log p(y_t)`` on the tokens
      of positive samples and ``-alpha * log(1 - p(y_t))`` on those of negative samples. The
      unlikelihood term is bounded: a negative token already improbable costs almost nothing, and
      ``log(1 - p)`` is computed stably so that ``p`` within ``1e-7`` of 1 still gives a finite loss
      and gradient.
    * ``variant: authors`` (the ULMA authors' ``UnlikelihoodTrainer``, default ``logloss``):
      sequence level, ``-mean_pos(s) + mean_neg(s)`` with ``s`` the per-token-mean log-prob of a
      sample. It lowers ``log p`` of negatives without bound (the loss has no minimum), where
      Welleck's term only drives ``p`` towards 0.

    Args:
        policy: the model and tokenizer.
        optimizer: optimizer and learning-rate schedule.
        variant: ``welleck`` or ``authors``.
        alpha: weight of the negative (unlikelihood) term (Welleck's alpha; 1 in the authors' code).
        reduction: for ``welleck``: ``token`` (mean over all response tokens of the batch),
            ``subset_mean`` (mean over positives plus mean over negatives of per-sample token means)
            or ``mean`` (mean of per-sample token means). Unused by ``authors``.
        positive_threshold: a score at or above it marks a positive sample.
        eps: the smallest ``1 - p`` the unlikelihood term resolves (see ``losses.log1m_exp``).
    """

    #: no reference; per-token means (the token-level objective's row values)
    spec = MethodSpec(reference="none", average_logps=True)

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        variant: UnlikelihoodVariant = "welleck",
        alpha: float = 1.0,
        reduction: UnlikelihoodReduction = "token",
        positive_threshold: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        check_numbers(alpha=(alpha, ">= 0"), positive_threshold=(positive_threshold, "in [0, 1]"), eps=(eps, "> 0"))
        check_choices(
            variant=(variant, get_args(UnlikelihoodVariant)), reduction=(reduction, get_args(UnlikelihoodReduction))
        )
        super().__init__(policy, optimizer)
        self.variant = variant
        self.alpha = alpha
        self.reduction = reduction
        self.positive_threshold = positive_threshold
        self.eps = eps

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        tokens = self.policy.token_logps(batch)
        return unlikelihood_loss(
            tokens.values,
            tokens.batch_index,
            batch["score"] >= self.positive_threshold,
            variant=self.variant,
            alpha=self.alpha,
            reduction=self.reduction,
            eps=self.eps,
        )
