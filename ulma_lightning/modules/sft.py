"""Supervised fine-tuning: token-level cross-entropy on the response tokens of demonstrations."""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import LossOutput, sft_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.policy import PolicyConfig

SFTReduction = Literal["token", "sequence"]


class SFTModule(AlignmentModule):
    """SFT on demonstrations (:class:`~ulma_lightning.DemonstrationDataModule`): ``-log pi(y|x)``.

    No reference model is built (``policy.reference`` is treated as ``none``). Log-probs come from
    the policy's chunked response-only path; full ``(B, T, vocab)`` logits are never formed.

    Args:
        policy: the model and tokenizer.
        optimizer: optimizer and learning-rate schedule.
        reduction: ``token`` (default): mean cross-entropy over all response tokens of the batch,
            so long responses weigh more; ``sequence``: mean over rows of each row's per-token mean
            (every demonstration weighs the same; this is ULMA's positive term with
            ``positive_term: sft`` and ``average_logps: true``). Under DDP each process averages its own batch
            and the gradients are averaged across processes.
    """

    #: no reference; per-token means (the token-level objective's row values)
    spec = MethodSpec(reference="none", average_logps=True)

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        reduction: SFTReduction = "token",
    ) -> None:
        super().__init__(policy, optimizer)
        check_choices(reduction=(reduction, get_args(SFTReduction)))
        self.reduction = reduction

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        tokens = self.policy.token_logps(batch)
        row_logps = tokens.per_sequence(average=True)
        if self.reduction == "sequence":
            return sft_loss(row_logps)
        loss = -tokens.values.mean()
        metrics = {"logps/positive": row_logps.detach().mean(), "perplexity": loss.detach().exp()}
        return LossOutput(loss=loss, metrics=metrics, losses=-row_logps.detach())
