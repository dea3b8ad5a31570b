"""Prompt-only inputs for generation: one item per prompt, left-padded batches.

Every data module's examples become :class:`PromptItem` s: the prompt, and as ``reference_response``
the record's own response (point-wise and demonstration data) or its chosen response (pairwise
data). A record that yields several examples (a pair read as two point-wise samples) gives one
prompt, its first example (the chosen side). Prompts are cut from the left to
``max_prompt_length`` tokens, keeping the turn being answered (and a leading BOS), as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ulma_lightning.data.features import keep_end, tokenize_pairs
from ulma_lightning.data.records import response_text

PROMPT_TEXT_KEYS = ("prompt", "reference_response", "reference_score")


@dataclass
class PromptItem:
    """A prompt to answer; ``reference_response`` is the data set's own answer, if any."""

    prompt: Any
    reference_response: str | None
    reference_score: float | None
    input_ids: list[int]


def reference_of(example: Any) -> tuple[str | None, float | None]:
    """The data set's answer to an example's prompt: its response, or the chosen side of a pair."""
    response = getattr(example, "response", None) or getattr(example, "chosen", None)
    return response_text(response), getattr(example, "score", None)


def unique_prompts(examples: Sequence[Any]) -> list[Any]:
    """The first example of each record (records are told apart by their location)."""
    seen: set[Any] = set()
    out = []
    for example in examples:
        key = getattr(example, "location", None) or id(example)
        if key in seen:
            continue
        seen.add(key)
        out.append(example)
    return out


def encode_prompts(tokenizer: Any, examples: Sequence[Any], max_prompt_length: int) -> list[PromptItem]:
    """Prompt-only token ids (formatted as in training, ending where the response begins)."""
    examples = [e for e in unique_prompts(examples) if e.prompt is not None]  # language-modeling text has no prompt
    if not examples:
        return []
    prompt_ids, _ = tokenize_pairs(tokenizer, [e.prompt for e in examples], ["x"] * len(examples))
    items = []
    for example, ids in zip(examples, prompt_ids):
        response, score = reference_of(example)
        ids = keep_end(list(ids), max_prompt_length, tokenizer.bos_token_id) if max_prompt_length > 0 else list(ids)
        items.append(PromptItem(example.prompt, response, score, ids))
    return items


class PromptDataset(Dataset):
    """Prompt items with their index; batches come from :class:`LeftPaddingCollator`."""

    def __init__(self, items: list[PromptItem]) -> None:
        self.items = items
        self.extra: dict[str, torch.Tensor] = {}  # no precomputed columns; kept for the data module's state

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {
            "index": index,
            "input_ids": item.input_ids,
            "prompt": item.prompt,
            "reference_response": item.reference_response,
            "reference_score": item.reference_score,
        }


class LeftPaddingCollator:
    """Left-pads prompt ids (generation appends on the right); text fields stay Python lists.

    Returns ``input_ids``, ``attention_mask``, ``index`` tensors and ``prompt``,
    ``reference_response``, ``reference_score`` lists.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            ids = item["input_ids"]
            if ids:
                input_ids[row, length - len(ids) :] = torch.as_tensor(ids)
                attention_mask[row, length - len(ids) :] = 1
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.as_tensor([item["index"] for item in items], dtype=torch.long),
        }
        for key in PROMPT_TEXT_KEYS:
            batch[key] = [item[key] for item in items]
        return batch
