"""Batch surgery for the modules: stacking batches into one forward, and mismatched (prompt, response) pairs.

A batch here is the collator's dict: ``input_ids``, ``attention_mask`` and ``labels`` of shape
``(B, T)``, right-padded, with ``labels == IGNORE_INDEX`` on prompt and padding positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ulma_lightning.data.features import Truncation
from ulma_lightning.logprobs import IGNORE_INDEX

SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def stack_batches(*batches: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Rows of several batches in one batch (padded to the longest), for a single forward pass.

    ``pad_token_id`` fills new ``input_ids`` positions; it matters only to models that find the
    last token by the pad id (sequence classifiers), the others read the attention mask.
    """
    length = max(b["input_ids"].shape[1] for b in batches)
    pads = dict(_PAD, input_ids=pad_token_id)
    return {
        key: torch.cat([F.pad(b[key], (0, length - b[key].shape[1]), value=pads[key]) for b in batches])
        for key in SEQUENCE_KEYS
    }


def side(batch: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """One side of a pairwise batch (``prefix`` is ``chosen_`` or ``rejected_``) as a plain batch."""
    return {key: batch[prefix + key] for key in SEQUENCE_KEYS}


def pair_batch(batch: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Chosen rows then rejected rows of a pairwise batch, padded to one length: shape ``(2B, T)``.

    Precomputed ``reference_chosen_logps`` / ``reference_rejected_logps`` become ``reference_logps``
    in the same order, so :meth:`Policy.reference_logps` reads them in ``precomputed`` mode.
    """
    out = stack_batches(side(batch, "chosen_"), side(batch, "rejected_"), pad_token_id=pad_token_id)
    if "reference_chosen_logps" in batch and "reference_rejected_logps" in batch:
        out["reference_logps"] = torch.cat([batch["reference_chosen_logps"], batch["reference_rejected_logps"]])
    return out


def swap_responses(
    prompts: dict[str, Tensor], responses: dict[str, Tensor], truncation: Truncation | None = None
) -> dict[str, Tensor]:
    """Row ``i``: the prompt of ``prompts`` row ``i`` followed by the response of ``responses`` row ``i``.

    With ``truncation`` (the data module's), each new pair is cut as a data sample would be. Used
    for KTO's mismatched pairs.
    """
    rows_ids, rows_labels = [], []
    for i in range(prompts["input_ids"].shape[0]):
        prompt_len = int((prompts["labels"][i] != IGNORE_INDEX).int().argmax())
        prompt = prompts["input_ids"][i, :prompt_len]
        response = responses["input_ids"][i][responses["labels"][i] != IGNORE_INDEX]
        if truncation is not None:
            kept_prompt, kept_response = truncation.apply(prompt.tolist(), response.tolist())
            prompt, response = prompt[len(prompt) - len(kept_prompt) :], response[: max(len(kept_response), 1)]
        ids = torch.cat([prompt, response])
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        rows_ids.append(ids)
        rows_labels.append(labels)
    length = max(len(r) for r in rows_ids)
    input_ids = torch.stack([F.pad(r, (0, length - len(r)), value=0) for r in rows_ids])
    labels = torch.stack([F.pad(r, (0, length - len(r)), value=IGNORE_INDEX) for r in rows_labels])
    attention_mask = torch.stack([F.pad(torch.ones_like(r), (0, length - len(r)), value=0) for r in rows_ids])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_groups(input_ids: Sequence[Any], labels: Sequence[Any]) -> list[int]:
    """A group per row, numbered by first appearance: rows whose prompt tokens (the positions before
    the first label) are identical share one. Rows are 1-D tensors or arrays."""
    groups: dict[tuple[int, ...], int] = {}
    out = []
    for ids, row_labels in zip(input_ids, labels):
        prompt_len = int((torch.as_tensor(row_labels) != IGNORE_INDEX).int().argmax())
        out.append(groups.setdefault(tuple(torch.as_tensor(ids[:prompt_len]).tolist()), len(groups)))
    return out


def mismatched_partners(groups: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
    """For each row, a partner row of another group (another prompt); ``-1`` where there is none.

    Rows are laid out group by group (groups in first-appearance order, or in a random order drawn
    from ``generator``, rows within a group likewise) and row ``p`` of the layout takes row
    ``p - m``, ``m`` being the largest group's size. While no group holds more than half the rows this
    is a permutation that never pairs two rows of one group. Otherwise the largest group's rows take
    the other rows in turn and the other rows take distinct rows of the largest group; if there is
    no other row (every row shares one prompt), there is no partner.
    """
    n = len(groups)
    partner = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return partner
    members: dict[int, list[int]] = {}
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else range(n)
    for row in order:
        members.setdefault(groups[row], []).append(row)
    layout = [row for rows in members.values() for row in rows]
    largest = max((len(rows) for rows in members.values()), default=0)
    if 2 * largest <= n:
        partner[torch.tensor(layout)] = torch.tensor(layout).roll(largest)
        return partner
    big = max(members.values(), key=len)
    rest = [row for row in layout if groups[row] != groups[big[0]]]
    if rest:
        partner[torch.tensor(big)] = torch.tensor(rest).repeat(len(big) // len(rest) + 1)[: len(big)]
        partner[torch.tensor(rest)] = torch.tensor(big[: len(rest)])
    return partner
