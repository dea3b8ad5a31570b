"""Prompt-only data for the RLHF modules (PPO, RLOO): the policy writes the responses."""

from __future__ import annotations

import logging
from typing import Any

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.data.errors import SkipReport
from ulma_lightning.data.prompts import LeftPaddingCollator, encode_prompts
from ulma_lightning.data.records import (
    Example,
    check_prompt,
    check_text,
    detect_format,
    is_hh_record,
    parse_demonstration,
    response_text,
    split_hh,
)
from ulma_lightning.data.sources import Location
from ulma_lightning.tokenizers import pad_token_id

log = logging.getLogger(__name__)

RESPONSE_FIELDS = ("response", "completion", "chosen", "rejected")


class PromptDataModule(AlignmentDataModule):
    """Prompts ``{prompt}`` (a string or chat messages) for :class:`~ulma_lightning.PPOModule` and
    :class:`~ulma_lightning.RLOOModule`; batches are **left-padded** prompt ids for generation.

    Any other record shape of the library is accepted too: point-wise ``{prompt, response, score}``,
    demonstrations, pairs ``{prompt, chosen, rejected}`` (or with implicit prompt, as conversations),
    ``{messages}`` (the turns before a final assistant answer, or the whole conversation when it ends
    with the user) and HH transcripts give their prompt; their responses are not trained on (said
    once in the log) and are kept as the reference answer for ``ulma evaluate``'s win rates. Prompts are cut from the
    left to ``max_prompt_length`` tokens (default ``max_length // 2``). A record repeated per response (two samples of a
    pair) is one prompt.

    Args:
        **kwargs: see :class:`~ulma_lightning.AlignmentDataModule`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._said_responses_ignored = False

    def parse_record(self, record: dict[str, Any], location: Location) -> list[Example]:
        present = [f for f in RESPONSE_FIELDS if record.get(f) is not None]
        if present and not self._said_responses_ignored:
            log.info(
                "%s: records carry responses (%s); they are ignored for training (the policy generates its own) and "
                "kept as reference answers for evaluation",
                location,
                ", ".join(present),
            )
            self._said_responses_ignored = True
        kind = detect_format(record)
        if kind == "implicit-preference" and isinstance(record["chosen"], list):
            return [parse_demonstration(record, location)]  # the shared leading messages
        if "prompt" not in record and is_hh_record(record):
            return [
                Example(*split_hh(check_text(record["chosen"], location, "chosen"), location, "chosen"), None, location)
            ]
        if kind == "messages" and isinstance(record["messages"], list) and record["messages"]:
            last = record["messages"][-1]
            if isinstance(last, dict) and last.get("role") == "assistant":
                return [parse_demonstration(record, location)]  # the turns before the assistant's answer
            return [Example(check_prompt(record["messages"], location, "messages"), "", None, location)]
        prompt = check_prompt(record.get("prompt"), location)
        answer = next((record[f] for f in ("response", "completion", "chosen") if record.get(f) is not None), "")
        reference = response_text(answer) if isinstance(answer, list) else answer
        return [Example(prompt, reference if isinstance(reference, str) else "", None, location)]

    def build_features(self, examples: list[Example], report: SkipReport) -> list[dict[str, Any]]:
        items = []
        for item in encode_prompts(self.tokenizer, examples, self.truncation.max_prompt_length):
            if not item.input_ids:
                report.add("the prompt has no tokens", str(item.prompt)[:40])
                continue
            items.append(
                {
                    "input_ids": item.input_ids,
                    "prompt": item.prompt,
                    "reference_response": item.reference_response,
                    "reference_score": item.reference_score,
                    "length": len(item.input_ids),
                }
            )
        return items

    @property
    def collator(self) -> LeftPaddingCollator:  # type: ignore[override]
        return LeftPaddingCollator(pad_token_id(self.tokenizer))
