"""A new pairwise loss: DPO with a target reward margin, ``-log sigma(beta * m - gamma)``.

``m = (log pi_c - log ref_c) - (log pi_r - log ref_r)``; ``gamma > 0`` asks the chosen response to
win by a margin (as SimPO's ``gamma``, here with the reference kept). One class: DPO's declaration
and one method (``loss``). Run it from the repository root on DPO's config, changing only the method:
``PYTHONPATH=. ulma fit --config configs/dpo.yaml --config examples/pairwise_loss.yaml`` (docs/extending.md).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ulma_lightning import DPOModule
from ulma_lightning.losses import LossOutput, pairwise_output


class MarginDPOModule(DPOModule):
    """DPO with a target margin ``gamma``.

    Args:
        gamma: the reward margin the chosen response should win by.
        **kwargs: the options of :class:`~ulma_lightning.DPOModule` (``policy``, ``beta``,
            ``average_logps``, ...), passed on.
    """

    def __init__(self, gamma: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma = gamma

    def loss(
        self, policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor
    ) -> LossOutput:
        chosen_rewards = self.beta * (policy_chosen - reference_chosen)
        rejected_rewards = self.beta * (policy_rejected - reference_rejected)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return pairwise_output(losses, policy_chosen, policy_rejected, chosen_rewards, rejected_rewards)
