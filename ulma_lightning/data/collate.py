"""Dynamic padding: each batch is padded to its own longest sequence (right padding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ulma_lightning.logprobs import IGNORE_INDEX

SEQUENCE_KEYS = {"input_ids": None, "labels": IGNORE_INDEX}


def _pad(rows: list[np.ndarray], value: int, multiple: int | None) -> torch.Tensor:
    length = max(len(r) for r in rows)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row)
    return out


class PaddingCollator:
    """Pads ``*input_ids`` with ``pad_token_id`` and ``*labels`` with ``IGNORE_INDEX``, adds
    ``*attention_mask``, and stacks every scalar field (scores, indices, reference log-probs) with
    :func:`stack_scalars`.

    Keys with a prefix (``chosen_input_ids``) are padded the same way, for pairwise data.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if key.endswith("input_ids"):
                ids = _pad(values, self.pad_token_id, self.pad_to_multiple_of)
                mask = _pad([np.ones(len(v), dtype=np.int64) for v in values], 0, self.pad_to_multiple_of)
                batch[key] = ids
                batch[key[: -len("input_ids")] + "attention_mask"] = mask
            elif key.endswith("labels"):
                batch[key] = _pad(values, IGNORE_INDEX, self.pad_to_multiple_of)
            elif key == "length":
                continue
            else:
                batch[key] = stack_scalars(values)
        return batch


def stack_scalars(values: list[Any]) -> torch.Tensor:
    """One value per sample (Python or numpy scalars, or 0-d tensors) as a ``(B,)`` tensor.

    Integer columns (``index``, KTO's ``kl_partner``) stay int64, exact at any dataset size (float32
    holds integers exactly only up to 2^24); booleans stay bool; the rest become float32.
    """
    stacked = torch.stack([torch.as_tensor(v) for v in values])
    if stacked.dtype == torch.bool:
        return stacked
    return stacked.float() if stacked.is_floating_point() else stacked.long()
