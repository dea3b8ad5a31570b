"""Tokenized features: prompt tokens masked from the loss, EOS appended, truncated to ``max_length``.

Truncation keeps the *end* of the prompt (the turn being answered) and then cuts the response:
a prompt is shortened from the left only as far as needed, never below ``max_prompt_length``
tokens; the response is then cut from the right to fit. A sample left with no response token is
dropped and counted. A BOS token the tokenizer put first in the prompt stays first: the tokens cut
are the ones after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ulma_lightning.data.formatting import format_pair, has_chat_template
from ulma_lightning.logprobs import IGNORE_INDEX


def keep_end(prompt: list[int], keep: int, bos_token_id: int | None = None) -> list[int]:
    """The last ``keep`` tokens of ``prompt``; a leading ``bos_token_id`` stays first (it counts in ``keep``)."""
    if keep >= len(prompt):
        return prompt
    head = 1 if keep > 0 and bos_token_id is not None and prompt[0] == bos_token_id else 0
    return prompt[:head] + prompt[len(prompt) - keep + head :]


@dataclass
class Truncation:
    """``max_length``: tokens per sequence; ``max_prompt_length``: the least prompt kept when cutting;
    ``bos_token_id``: the tokenizer's BOS, kept first when a prompt that starts with it is cut."""

    max_length: int
    max_prompt_length: int
    bos_token_id: int | None = None

    def apply(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        overflow = len(prompt) + len(response) - self.max_length
        if overflow > 0:
            keep = max(len(prompt) - overflow, min(len(prompt), self.max_prompt_length))
            prompt = keep_end(prompt, keep, self.bos_token_id)
        room = self.max_length - len(prompt)
        return prompt, response[: max(room, 0)]


@dataclass
class TruncationReport:
    """How much truncation cut from one split's samples: counts and tokens, prompts and responses."""

    split: str
    samples: int = 0
    prompts_cut: int = 0
    prompt_tokens_cut: int = 0
    prompts_halved: int = 0  # prompts that lost more than half their tokens
    responses_cut: int = 0
    response_tokens_cut: int = 0

    def add(self, prompt: int, kept_prompt: int, response: int, kept_response: int) -> None:
        """Count one sample by its token counts before and after truncation."""
        self.samples += 1
        if kept_prompt < prompt:
            self.prompts_cut += 1
            self.prompt_tokens_cut += prompt - kept_prompt
            self.prompts_halved += kept_prompt * 2 < prompt
        if kept_response < response:
            self.responses_cut += 1
            self.response_tokens_cut += response - kept_response

    def summary(self) -> str:
        return (
            f"{self.split} split: truncation to max_length cut {self.prompts_cut} of {self.samples} prompts "
            f"({self.prompt_tokens_cut} tokens, {self.prompts_halved} by more than half) and "
            f"{self.responses_cut} responses ({self.response_tokens_cut} tokens)"
        )

    def log(self, logger: Any, truncation: Truncation) -> None:
        """Log the summary when anything was cut; warn when most prompts lost more than half."""
        if not (self.prompts_cut or self.responses_cut):
            return
        if self.prompts_halved * 2 > self.samples:
            logger.warning(
                "%s: most prompts lost more than half their tokens (max_length %d, max_prompt_length %d); "
                "raise max_length or max_prompt_length",
                self.summary(), truncation.max_length, truncation.max_prompt_length,
            )  # fmt: skip
        else:
            logger.info("%s", self.summary())


def tokenize_pairs(
    tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of formatted prompts and of responses (with EOS), tokenized separately.

    See :func:`~ulma_lightning.data.formatting.format_pair`: a conversational completion with a chat
    template is the template's assistant turn (EOS appended only if the template writes none).
    """
    if not prompts:
        return [], []  # fast tokenizers fail on an empty batch
    templated = has_chat_template(tokenizer)
    formatted = [format_pair(p, r, tokenizer) for p, r in zip(prompts, responses)]
    prompt_ids = tokenizer([f[0] for f in formatted], add_special_tokens=not templated)["input_ids"]
    response_ids = tokenizer([f[1] for f in formatted], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses must end with one")
    return list(prompt_ids), [list(ids) + [eos] if f[2] else list(ids) for ids, f in zip(response_ids, formatted)]


def build_sequence(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``labels`` (prompt positions set to ``IGNORE_INDEX``)."""
    input_ids = np.asarray(prompt + response, dtype=np.int64)
    labels = input_ids.copy()
    labels[: len(prompt)] = IGNORE_INDEX
    return input_ids, labels


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[Any],
    responses: Sequence[Any],
    truncate: Callable[[list[int], list[int]], tuple[list[int], list[int]]],
    *,
    drop_empty: bool = True,
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The one path from text to model inputs: tokenize (prompt, response) pairs (:func:`tokenize_pairs`),
    cut each with ``truncate``, and build ``(input_ids, labels)`` (:func:`build_sequence`); None where
    no response token is left and ``drop_empty`` is set."""
    prompt_ids, response_ids = tokenize_pairs(tokenizer, prompts, responses)
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for p, r in zip(prompt_ids, response_ids):
        p, r = truncate(p, r)
        out.append(build_sequence(p, r) if r or not drop_empty else None)
    return out


def scoring_batches(
    tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any], max_length: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of whole (prompt, response) sequences for a reward model to score, built as the
    data modules build them (:func:`encode_pairs`): truncated to ``max_length``, keeping the end of
    the prompt (at least ``max_length // 2`` of its tokens when it is that long); every row kept."""
    from ulma_lightning.data.collate import PaddingCollator
    from ulma_lightning.tokenizers import pad_token_id

    truncation = Truncation(max_length, max_length // 2, tokenizer.bos_token_id)
    collate = PaddingCollator(pad_token_id(tokenizer))
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        encoded = encode_pairs(
            tokenizer, list(prompts[part]), list(responses[part]), truncation.apply, drop_empty=False
        )
        yield collate([{"input_ids": input_ids, "labels": labels} for input_ids, labels in encoded])  # type: ignore[misc]


class FeatureDataset(Dataset):
    """Tokenized samples in memory; each item is a dict of numpy arrays and scalars.

    ``extra`` holds per-sample columns added after tokenization (e.g. precomputed
    ``reference_logps``); they are returned with every item.
    """

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.extra: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.items[index])
        for name, column in self.extra.items():
            item[name] = column[index]
        return item

    def lengths(self) -> list[int]:
        """Token count of each sample (the longest sequence of the sample for pairs)."""
        return [int(item["length"]) for item in self.items]
