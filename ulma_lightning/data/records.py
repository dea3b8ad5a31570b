"""Validated records: raw dicts in, typed examples out, or a :class:`DataError` naming the field.

Record shapes (after the optional column mapping):

* point-wise ``{prompt, response, score}``;
* demonstration ``{prompt, response}``;
* pairwise ``{prompt, chosen, rejected}``;
* HH transcripts ``{chosen, rejected}``, each a whole ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
  string, split at the last ``"\\n\\nAssistant:"`` (earlier turns are the prompt);
* a point-wise HH transcript ``{transcript, score}`` (e.g. HH's red-team attempts, with
  ``columns: {score: rating}``), split the same way.

A prompt is a string or a list of chat messages ``{"role": ..., "content": ...}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ulma_lightning.data.errors import DataError
from ulma_lightning.data.sources import Location

Prompt = Union[str, list[dict[str, str]]]
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"


@dataclass
class Example:
    """One (prompt, response) sample; ``score`` is None for demonstrations."""

    prompt: Prompt
    response: str
    score: float | None
    location: Location


@dataclass
class PairExample:
    """One preference pair."""

    prompt: Prompt
    chosen: str
    rejected: str
    location: Location


def in_user_terms(error: DataError, columns: dict[str, str] | None) -> DataError:
    """``error`` naming the user's column where ``columns`` mapped one of ours (``rating``, not ``score``)."""
    if not columns or error.field is None:
        return error
    ours = error.field.split("[")[0]
    if ours not in columns:
        return error
    return DataError(error.location, columns[ours] + error.field[len(ours) :], error.problem)


def apply_columns(raw: Any, columns: dict[str, str] | None, location: Location) -> dict[str, Any]:
    """Rename the user's columns to ours (``columns`` maps our name to theirs)."""
    if isinstance(raw, DataError):
        raise raw
    if not isinstance(raw, dict):
        raise DataError(location, None, f"expected a JSON object, got {type(raw).__name__}")
    if not columns:
        return raw
    record = dict(raw)
    for ours, theirs in columns.items():
        if theirs in raw:
            record[ours] = raw[theirs]
    return record


def split_hh(transcript: str, location: Location, field: str) -> tuple[str, str]:
    """Split an HH transcript into (prompt ending in ``"\\n\\nAssistant:"``, final response)."""
    cut = transcript.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(location, field, 'no "\\n\\nAssistant:" turn in the transcript')
    prompt = transcript[: cut + len(ASSISTANT_MARKER)]
    response = transcript[cut + len(ASSISTANT_MARKER) :]
    if not response.strip():
        raise DataError(location, field, "the final assistant response is empty")
    return prompt, response


def check_prompt(value: Any, location: Location, field: str = "prompt") -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DataError(location, f"{field}[{i}]", "a chat message must be an object with string 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise DataError(location, field, "missing")
    raise DataError(location, field, f"expected a string or a non-empty list of chat messages, got {type(value).__name__}")


def check_text(value: Any, location: Location, field: str) -> str:
    if value is None:
        raise DataError(location, field, "missing")
    if not isinstance(value, str):
        raise DataError(location, field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(location, field, "empty")
    return value


def check_score(value: Any, location: Location, score_range: tuple[float, float], field: str = "score") -> float:
    """A number within ``score_range``, normalised to ``[0, 1]``. Booleans count as 0/1."""
    if value is None:
        raise DataError(location, field, "missing")
    if isinstance(value, bool):
        value = float(value)
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(location, field, f"expected a number, got the string {value!r}") from None
    elif not isinstance(value, (int, float)):
        raise DataError(location, field, f"expected a number, got {type(value).__name__}")
    low, high = score_range
    if math.isnan(value) or not low <= value <= high:
        raise DataError(location, field, f"{value} is outside the declared score_range [{low}, {high}]")
    return (float(value) - low) / (high - low)


def is_hh_record(record: dict[str, Any]) -> bool:
    return "chosen" in record and "rejected" in record and "prompt" not in record


def parse_pair(record: dict[str, Any], location: Location) -> PairExample:
    """A pairwise record or an HH transcript pair; HH pairs must share their prompt."""
    if is_hh_record(record):
        chosen_prompt, chosen = split_hh(check_text(record["chosen"], location, "chosen"), location, "chosen")
        rejected_prompt, rejected = split_hh(check_text(record["rejected"], location, "rejected"), location, "rejected")
        if chosen_prompt != rejected_prompt:
            raise DataError(location, "rejected", "chosen and rejected differ before the last assistant turn")
        return PairExample(chosen_prompt, chosen, rejected, location)
    prompt = check_prompt(record.get("prompt"), location)
    return PairExample(prompt, check_text(record.get("chosen"), location, "chosen"), check_text(record.get("rejected"), location, "rejected"), location)


def parse_pointwise(
    record: dict[str, Any], location: Location, score_range: tuple[float, float], lower_is_better: bool = False
) -> list[Example]:
    """Point-wise examples from one record; a pair becomes two (chosen -> 1, rejected -> 0).

    A ``score`` is normalised through ``score_range`` to ``[0, 1]``, and turned into ``1 - score`` when
    ``lower_is_better``. A ``{transcript, score}`` record is split at its last assistant turn.
    """
    if "response" not in record and "chosen" in record and "rejected" in record:
        if is_hh_record(record):
            examples = []
            for field, score in (("chosen", 1.0), ("rejected", 0.0)):
                prompt, response = split_hh(check_text(record[field], location, field), location, field)
                examples.append(Example(prompt, response, score, location))
            return examples
        pair = parse_pair(record, location)
        return [Example(pair.prompt, pair.chosen, 1.0, location), Example(pair.prompt, pair.rejected, 0.0, location)]
    if "transcript" in record and "prompt" not in record and "response" not in record:
        prompt, response = split_hh(check_text(record["transcript"], location, "transcript"), location, "transcript")
    else:
        prompt = check_prompt(record.get("prompt"), location)
        response = check_text(record.get("response"), location, "response")
    score = check_score(record.get("score"), location, score_range)
    return [Example(prompt, response, 1.0 - score if lower_is_better else score, location)]


def parse_demonstration(record: dict[str, Any], location: Location) -> Example:
    """A demonstration; from pairwise or HH data the chosen side is the demonstration."""
    if "response" not in record and "chosen" in record:
        if "prompt" not in record:
            prompt, response = split_hh(check_text(record["chosen"], location, "chosen"), location, "chosen")
            return Example(prompt, response, None, location)
        return Example(check_prompt(record.get("prompt"), location), check_text(record["chosen"], location, "chosen"), None, location)
    return Example(check_prompt(record.get("prompt"), location), check_text(record.get("response"), location, "response"), None, location)
