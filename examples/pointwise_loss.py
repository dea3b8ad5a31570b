"""A new point-wise loss: SFT on positives, a hinge on the implicit reward of negatives.

``loss = -log pi(y|x)`` for a positive, ``max(0, margin + beta * h)`` for a negative, with
``h = log pi(y|x) - log pi_ref(y|x)``: a negative stops contributing once its reward is ``margin``
below zero (a point-wise SLiC-style hinge). One class: a declaration (``spec``) and one method
(``loss``). Run it from the repository root on ULMA's config, changing only the method:
``PYTHONPATH=. ulma fit --config configs/ulma.yaml --config examples/pointwise_loss.yaml``
(docs/extending.md walks through it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ulma_lightning import PointwiseModule
from ulma_lightning.losses import LossOutput, pointwise_output


class HingeNegativeModule(PointwiseModule):
    """SFT on positives, ``max(0, margin + beta * h)`` on negatives.

    Args:
        margin: how far below zero a negative's reward ``beta * h`` must go before it stops counting.
        **kwargs: the options of :class:`~ulma_lightning.PointwiseModule` (``policy``, ``optimizer``,
            ``beta``, ``reduction``, ...): passed on, so a config's options for them still apply.
    """

    #: the reference model runs on negatives only: a positive's loss does not read it
    spec = PointwiseModule.spec.replace(reference="negatives")

    def __init__(self, margin: float = 1.0, **kwargs: Any) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        super().__init__(**kwargs)
        self.margin = margin

    def loss(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor) -> LossOutput:
        positive = scores >= self.positive_threshold
        rewards = self.beta * (policy_logps - reference_logps)  # NaN on positives (no reference forward)
        negative_loss = torch.relu(self.margin + torch.where(positive, torch.zeros_like(rewards), rewards))
        losses = torch.where(positive, -policy_logps, negative_loss)
        return pointwise_output(losses, positive, policy_logps, reduction=self.reduction, rewards=rewards)  # type: ignore[arg-type]
