"""Held-out perplexity, token-weighted, from the response-token log-probs a step already computed.

``perplexity = exp(sum of token NLL / number of tokens)`` over every response token of every
demonstration seen in the epoch: long responses weigh more, as in a language-model evaluation (it is
not the mean of per-sequence perplexities). Demonstrations are the rows of a demonstration batch,
the positives (``score >= positive_threshold``) of a point-wise batch, and the chosen side of a
pairwise batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ulma_lightning.logprobs import IGNORE_INDEX, TokenLogps

SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


class TokenPerplexity(Metric):
    """``exp(sum NLL / tokens)``, accumulated over batches (and summed across processes)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_logps: Tensor) -> None:  # type: ignore[override]
        """Add the log-probs of some response tokens (shape ``(N,)``)."""
        self.nll += -token_logps.detach().to(torch.float64).sum()
        self.tokens += token_logps.numel()

    def compute(self) -> Tensor:
        if int(self.tokens) == 0:
            return torch.tensor(float("nan"))
        return torch.exp(self.nll / self.tokens).float()


def demonstration_rows(
    batch: dict[str, Any], positive_threshold: float
) -> tuple[dict[str, Tensor], Tensor | None] | None:
    """The sequences whose responses count for perplexity, and a row mask (None: every row).

    Point-wise batches (with ``score``): rows with ``score >= positive_threshold``; demonstration
    batches (no ``score``): every row; pairwise batches: the chosen side. None when the batch has
    none of these shapes.
    """
    if "input_ids" in batch and "labels" in batch:
        sequences = {key: batch[key] for key in SEQUENCE_KEYS}
        rows = batch["score"] >= positive_threshold if "score" in batch else None
        return sequences, rows
    if "chosen_input_ids" in batch and "chosen_labels" in batch:
        return {key: batch["chosen_" + key] for key in SEQUENCE_KEYS}, None
    return None


def _same_rows(recorded: dict[str, Tensor], sequences: dict[str, Tensor]) -> bool:
    """Whether the first rows of a recorded forward hold exactly ``sequences`` (up to right padding)."""
    ids, labels = sequences["input_ids"], sequences["labels"]
    rec_ids, rec_labels = recorded.get("input_ids"), recorded.get("labels")
    if rec_ids is None or rec_labels is None:
        return False
    if rec_ids is ids and rec_labels is labels:
        return True
    rows, width = ids.shape
    if rec_ids.shape[0] < rows or rec_ids.device != ids.device:
        return False
    common = min(width, rec_ids.shape[1])
    if (labels[:, common:] != IGNORE_INDEX).any():
        return False
    if (rec_labels[:rows, common:] != IGNORE_INDEX).any():
        return False
    return bool(
        torch.equal(rec_ids[:rows, :common], ids[:, :common])
        and torch.equal(rec_labels[:rows, :common], labels[:, :common])
    )


def reuse_token_logps(
    records: list[tuple[dict[str, Tensor], TokenLogps]], sequences: dict[str, Tensor]
) -> TokenLogps | None:
    """The token log-probs of ``sequences`` from a policy forward of this step, if one covered them.

    A forward covers them when its first ``B`` rows hold the same tokens and labels (e.g. the batch
    itself, or chosen rows stacked before rejected rows in a pairwise step).
    """
    rows = sequences["input_ids"].shape[0]
    for recorded, tokens in records:
        if _same_rows(recorded, sequences):
            keep = tokens.batch_index < rows
            return TokenLogps(tokens.values[keep], tokens.batch_index[keep], rows)
    return None
