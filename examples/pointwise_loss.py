"""A new point-wise loss: SFT on positives, a hinge on the implicit reward of negatives.

``loss = -log pi(y|x)`` for a positive, ``max(0, margin + beta * h)`` for a negative, with
``h = log pi(y|x) - log pi_ref(y|x)``: a negative stops contributing once its reward is ``margin``
below zero (a point-wise SLiC-style hinge). Run it with
``PYTHONPATH=. ulma fit --config examples/pointwise_loss.yaml`` (docs/extending.md walks through it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ulma_lightning import PointwiseModule
from ulma_lightning.losses import LossOutput, pointwise_output
from ulma_lightning.modules.base import Stage


def hinge_negative_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    scores: Tensor,
    *,
    beta: float = 0.1,
    margin: float = 1.0,
    reduction: str = "subset_mean",
    positive_threshold: float = 1.0,
) -> LossOutput:
    """SFT on positives, ``max(0, margin + beta * h)`` on negatives; ``reference_logps`` may be NaN
    at positives (never read there)."""
    positive = scores >= positive_threshold
    rewards = beta * (policy_logps - reference_logps)  # NaN where the reference was skipped
    negative_loss = torch.relu(margin + torch.where(positive, torch.zeros_like(rewards), rewards))
    losses = torch.where(positive, -policy_logps, negative_loss)
    return pointwise_output(losses, positive, policy_logps, reduction=reduction, rewards=rewards)  # type: ignore[arg-type]


class HingeNegativeModule(PointwiseModule):
    """SFT on positives, a hinge on negatives' implicit reward (:func:`hinge_negative_loss`).

    Args:
        margin: how far below zero a negative's reward ``beta * h`` must go before it stops counting.
        **kwargs: the options of :class:`~ulma_lightning.PointwiseModule` (``policy``, ``optimizer``,
            ``beta``, ``reduction``, ...): passed on, so a config's options for them still apply.
    """

    def __init__(self, margin: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def reference_rows(self, scores: Tensor, stage: Stage) -> Tensor | None:
        return scores < self.positive_threshold  # the reference runs on negatives only

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        return hinge_negative_loss(
            policy_logps, reference_logps, scores, beta=self.beta, margin=self.margin,
            reduction=self.reduction, positive_threshold=self.positive_threshold,
        )  # fmt: skip
