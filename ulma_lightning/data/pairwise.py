"""Preference pairs ``{prompt, chosen, rejected}`` (and HH transcripts) for pairwise DPO and reward models."""

from __future__ import annotations

from typing import Any

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.data.errors import DataError, SkipReport
from ulma_lightning.data.features import Truncation, build_sequence, tokenize_pairs
from ulma_lightning.data.records import PairExample, parse_pair
from ulma_lightning.data.sources import Location


def truncate_pair(
    truncation: Truncation, prompt: list[int], chosen: list[int], rejected: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """Cut both sides of a pair with the *same* prompt: the prompt is shortened (from the left) as
    the longer response needs, then each response is cut from the right to fit ``max_length``."""
    prompt, _ = truncation.apply(prompt, chosen if len(chosen) >= len(rejected) else rejected)
    room = max(truncation.max_length - len(prompt), 0)
    return prompt, chosen[:room], rejected[:room]


class PairwiseDataModule(AlignmentDataModule):
    """Preference pairs for :class:`~ulma_lightning.DPOModule` and :class:`~ulma_lightning.RewardModelModule`.

    Records are ``{prompt, chosen, rejected}`` or HH transcripts ``{chosen, rejected}``. An HH pair
    whose two transcripts differ before the last assistant turn is a bad record: it stops the run
    with its file:line (``on_bad_record: error``) or is skipped and counted (``skip``); so is a pair
    whose chosen and rejected responses are the same (it prefers neither). Both sides
    share the prompt tokens and its truncation. Each item carries ``chosen_input_ids``,
    ``chosen_labels``, ``rejected_input_ids`` and ``rejected_labels``; the collator pads each side
    to its own longest sequence and adds ``chosen_attention_mask`` / ``rejected_attention_mask``.

    Args:
        **kwargs: see :class:`~ulma_lightning.AlignmentDataModule`.
    """

    def parse_record(self, record: dict[str, Any], location: Location) -> list[PairExample]:
        pair = parse_pair(record, location)
        if pair.chosen == pair.rejected:
            raise DataError(
                location, "rejected",
                "the same response as chosen: the pair prefers neither (a DPO loss of ln 2 that never moves, a reward "
                "margin of 0)",
                "fix the pair, drop it, or set on_bad_record: skip to skip such pairs",
            )  # fmt: skip
        return [pair]

    def build_features(self, examples: list[PairExample], report: SkipReport) -> list[dict[str, Any]]:
        prompts = [e.prompt for e in examples]
        prompt_ids, chosen_ids = tokenize_pairs(self.tokenizer, prompts, [e.chosen for e in examples])
        _, rejected_ids = tokenize_pairs(self.tokenizer, prompts, [e.rejected for e in examples])
        items = []
        for example, p, c, r in zip(examples, prompt_ids, chosen_ids, rejected_ids):
            kept, _, _ = truncate_pair(self.truncation, p, c, r)  # one prompt for both sides
            _, c = self.truncate(p, c, kept)  # each side counted as a sample
            p, r = self.truncate(p, r, kept)
            if not c or not r:
                report.add("no response tokens left after truncation to max_length", str(example.location))
                continue
            chosen_input_ids, chosen_labels = build_sequence(p, c)
            rejected_input_ids, rejected_labels = build_sequence(p, r)
            items.append(
                {
                    "chosen_input_ids": chosen_input_ids,
                    "chosen_labels": chosen_labels,
                    "rejected_input_ids": rejected_input_ids,
                    "rejected_labels": rejected_labels,
                    "length": max(len(chosen_input_ids), len(rejected_input_ids)),
                }
            )
        return items
