"""Pairwise DPO and its IPO and hinge variants, on preference pairs."""

from __future__ import annotations

from typing import get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import DPOLossType, LossOutput, dpo_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig
from ulma_lightning.modules.batching import pair_batch
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig

#: a pairwise method's declaration: both sides' reference log-probs, stored per pair when precomputed
PAIRWISE = MethodSpec(precomputed_columns=("reference_chosen_logps", "reference_rejected_logps"))


class DPOModule(AlignmentModule):
    """Direct Preference Optimization (Rafailov et al. 2023) on :class:`~ulma_lightning.PairwiseDataModule`.

    Chosen and rejected responses run in one forward pass (both sides padded to one length and
    stacked), for the policy and for the reference. Every reference mode of the policy works; with
    ``precomputed`` the reference log-probs of both sides are computed once before training and
    stored with each pair (``reference_chosen_logps``, ``reference_rejected_logps``). Logs
    ``rewards/positive`` (chosen), ``rewards/negative`` (rejected), ``rewards/margin``,
    ``rewards/accuracy``, ``logps/positive`` and ``logps/negative``: the point-wise methods' names.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength (IPO's tau for ``loss_type: ipo``).
        loss_type: ``sigmoid`` (DPO; conservative DPO with ``label_smoothing``), ``ipo`` or ``hinge``.
        label_smoothing: the assumed share of flipped labels for ``sigmoid`` (0 is plain DPO).
        average_logps: per-token mean (True) or summed (False) sequence log-probs. Default (null):
            summed for ``sigmoid`` and ``hinge`` (the DPO paper, TRL), per-token mean for ``ipo``
            (as TRL and the IPO authors normalise it).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        average_logps: bool | None = None,
    ) -> None:
        check_numbers(beta=(beta, "> 0"))
        check_choices(loss_type=(loss_type, get_args(DPOLossType)))
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        super().__init__(
            policy, optimizer, PAIRWISE.replace(average_logps=loss_type == "ipo")
        )  # average_logps, when set, wins
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    def loss(
        self, policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor
    ) -> LossOutput:  # type: ignore[override]
        """The objective from per-pair log-probs, each ``(B,)``."""
        return dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        )  # fmt: skip

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-pair policy log-probs of both sides; for prompt-only batches (``ulma predict``), generations."""
        if "chosen_input_ids" not in batch:
            return super().predict_step(batch, batch_idx)
        chosen, rejected = self.policy.logps(pair_batch(batch), average=self.average_logps).chunk(2)
        return {"index": batch["index"], "policy_chosen_logps": chosen, "policy_rejected_logps": rejected}
