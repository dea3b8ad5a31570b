"""Validated records: raw dicts in, typed examples out, or a :class:`DataError` naming the field.

Record formats (after the optional column mapping), recognised by their fields (:func:`detect_format`),
each in the standard form (strings) or the conversational form (lists of chat messages
``{"role": ..., "content": ...}``), as TRL defines them:

* language modeling ``{text}`` (no prompt: the whole text is trained on) and ``{messages}`` (the last
  turn, the assistant's, is the completion; the earlier turns are the prompt);
* prompt-completion ``{prompt, completion}`` (``{prompt, response}`` is the same);
* point-wise ``{prompt, completion, score}`` (or ``response``), the score within a declared range;
* unpaired preference ``{prompt, completion, label}`` (KTO's), ``label`` a boolean: the binary score;
* preference ``{prompt, chosen, rejected}``, and with implicit prompt ``{chosen, rejected}``: as
  conversations, the shared leading messages are the prompt; as strings, HH transcripts, each a whole
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` string split at the last ``"\\n\\nAssistant:"``, and
  other strings share their longest common prefix as the prompt (TRL's standard form);
* a point-wise HH transcript ``{transcript, score}`` (e.g. HH's red-team attempts, with
  ``columns: {score: rating}``), split the same way.

A conversational completion (``completion``, ``chosen``, ``rejected``) is one assistant message; a
prompt is a string or a list of chat messages (a system message is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ulma_lightning.data.errors import DataError
from ulma_lightning.data.sources import Location

Message = dict[str, str]
#: a prompt: a string, chat messages, or None for language-modeling text (no prompt)
Prompt = str | list[Message] | None
#: a response: a string, or (conversational) a list holding the one assistant message
Response = str | list[Message]
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"

#: format name -> how the error messages and the log describe it
FORMATS = {
    "text": "language modeling {text}",
    "messages": "language modeling {messages}",
    "prompt-completion": "prompt-completion {prompt, completion}",
    "pointwise": "point-wise {prompt, completion, score}",
    "unpaired-preference": "unpaired preference {prompt, completion, label}",
    "preference": "preference {prompt, chosen, rejected}",
    "implicit-preference": (
        "preference with implicit prompt {chosen, rejected} (conversations, HH transcripts, or strings with a shared "
        "prefix)"
    ),
    "hh-transcript": "HH transcript {transcript, score}",
}


@dataclass
class Example:
    """One (prompt, response) sample; ``score`` is None for demonstrations."""

    prompt: Prompt
    response: Response
    score: float | None
    location: Location


@dataclass
class PairExample:
    """One preference pair."""

    prompt: Prompt
    chosen: Response
    rejected: Response
    location: Location


def response_text(response: Response | None) -> str | None:
    """A response as plain text (a conversational completion's content)."""
    if isinstance(response, list):
        return response[0]["content"] if response else None
    return response


def _present(record: dict[str, Any], field: str) -> bool:
    return record.get(field) is not None


def detect_format(record: dict[str, Any]) -> str | None:
    """The name (a key of :data:`FORMATS`) of the format ``record``'s fields fit, or None."""
    if _present(record, "chosen") and _present(record, "rejected"):
        return "preference" if "prompt" in record else "implicit-preference"
    if _present(record, "completion") or _present(record, "response"):
        if _present(record, "score"):
            return "pointwise"
        if _present(record, "label"):
            return "unpaired-preference"
        return "prompt-completion"
    if "transcript" in record and "prompt" not in record:
        return "hh-transcript"
    if _present(record, "messages"):
        return "messages"
    if _present(record, "text"):
        return "text"
    return None


def is_conversational(record: dict[str, Any]) -> bool:
    """Whether the record is in the conversational form (any of its texts a list of messages)."""
    return any(
        isinstance(record.get(f), list) for f in ("prompt", "completion", "response", "chosen", "rejected", "messages")
    )


def format_label(record: dict[str, Any]) -> str:
    """The detected format and form, for the log: ``prompt-completion (conversational)``."""
    name = detect_format(record) or "unrecognised"
    return f"{name} ({'conversational' if is_conversational(record) else 'standard'})"


def no_format(record: dict[str, Any], location: Location, accepted: tuple[str, ...]) -> DataError:
    """The error for a record that fits none of the ``accepted`` formats: names them."""
    expected = "; ".join(FORMATS[name] for name in accepted)
    fields = ", ".join(sorted(map(str, record))) or "none"
    problem = f"the record's fields ({fields}) match none of the formats read here: {expected}"
    if "prompt" in record:  # a prompt without an answer: the answer is what is missing
        return DataError(location, "response", f"missing: {problem}")
    return DataError(
        location, None, problem, "map your fields with columns:, fix the record, or set on_bad_record: skip"
    )


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


def split_string_pair(record: dict[str, Any], location: Location) -> tuple[tuple[str, str], tuple[str, str]]:
    """((prompt, chosen), (prompt, rejected)) of a ``{chosen, rejected}`` pair of strings: HH transcripts
    split each at its last ``"\n\nAssistant:"``; other strings (TRL's standard implicit-prompt form)
    share their longest common prefix as the prompt (ending before a space, as TRL's
    ``extract_prompt`` cuts it)."""
    chosen, rejected = (check_text(record[field], location, field) for field in ("chosen", "rejected"))
    if any(
        marker in text for marker in (HUMAN_MARKER, ASSISTANT_MARKER) for text in (chosen, rejected)
    ):  # HH transcripts
        return split_hh(chosen, location, "chosen"), split_hh(rejected, location, "rejected")
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    if cut == min(len(chosen), len(rejected)):
        raise DataError(
            location, "rejected", "one answer is the start of the other: no answer is left after the shared prompt"
        )
    if cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    if cut == 0:
        raise DataError(
            location, "rejected", "chosen and rejected share no leading text: there is no prompt",
            "give the prompt in a prompt field, or the pair as HH transcripts or chat messages",
        )  # fmt: skip
    return (chosen[:cut], chosen[cut:]), (rejected[:cut], rejected[cut:])


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
                raise DataError(
                    location, f"{field}[{i}]", "a chat message must be an object with string 'role' and 'content'"
                )
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None:
        raise DataError(location, field, "missing")
    raise DataError(
        location, field, f"expected a string or a non-empty list of chat messages, got {type(value).__name__}"
    )


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


def check_label(value: Any, location: Location, field: str = "label") -> float:
    """An unpaired-preference label (a boolean; ``true``/``false`` or 0/1 from text files) as 1.0 or 0.0."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return 1.0 if value.strip().lower() in ("true", "1") else 0.0
    if value is None:
        raise DataError(location, field, "missing")
    raise DataError(location, field, f"expected a boolean (true: desirable, false: undesirable), got {value!r}")


def check_completion(value: Any, location: Location, field: str) -> Response:
    """A completion: a string, or (conversational) a list holding one assistant message."""
    if not isinstance(value, list):
        return check_text(value, location, field)
    if not value:
        raise DataError(location, field, "empty: a conversational completion holds one assistant message")
    messages = check_prompt(value, location, field)
    assert isinstance(messages, list)
    if len(messages) != 1:
        raise DataError(
            location, field,
            f"a multi-turn completion ({len(messages)} messages) is not supported: a completion is one "
            "assistant message; put the earlier turns in the prompt",
        )  # fmt: skip
    if messages[0]["role"] != "assistant":
        raise DataError(
            location,
            f"{field}[0]",
            f"the completion's role is {messages[0]['role']!r}; a completion is the assistant's message",
        )
    check_text(messages[0]["content"], location, f"{field}[0].content")
    return messages


def split_conversation(value: Any, location: Location, field: str = "messages") -> tuple[list[Message], list[Message]]:
    """A ``{messages}`` conversation as (prompt: every turn before the last, completion: the last, the assistant's)."""
    if not isinstance(value, list):
        raise DataError(location, field, f"expected a list of chat messages, got {type(value).__name__}")
    messages = check_prompt(value, location, field)
    assert isinstance(messages, list)
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            location,
            field,
            f"the conversation's last turn is {last['role']!r}, not the assistant's: it has no completion to train on",
        )
    if len(messages) == 1:
        raise DataError(location, field, "the conversation is one assistant message: it has no prompt")
    check_text(last["content"], location, f"{field}[{len(messages) - 1}].content")
    return messages[:-1], [last]


def is_hh_record(record: dict[str, Any]) -> bool:
    return "chosen" in record and "rejected" in record and "prompt" not in record


def _implicit_pair(record: dict[str, Any], location: Location) -> PairExample:
    """A conversational pair with implicit prompt: the shared leading messages are the prompt."""
    for field in ("chosen", "rejected"):
        if not isinstance(record[field], list):
            other = "rejected" if field == "chosen" else "chosen"
            raise DataError(
                location, field, f"expected a list of chat messages like {other!r}, got {type(record[field]).__name__}"
            )
    chosen = check_prompt(record["chosen"], location, "chosen")
    rejected = check_prompt(record["rejected"], location, "rejected")
    assert isinstance(chosen, list) and isinstance(rejected, list)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            location,
            "rejected",
            "chosen and rejected share no leading message: there is no prompt (the shared turns before the answers)",
        )
    return PairExample(
        chosen[:shared],
        check_completion(chosen[shared:], location, "chosen"),
        check_completion(rejected[shared:], location, "rejected"),
        location,
    )


PAIRWISE_FORMATS = ("preference", "implicit-preference")
POINTWISE_FORMATS = (
    "pointwise",
    "unpaired-preference",
    "preference",
    "implicit-preference",
    "hh-transcript",
    "prompt-completion",
    "messages",
    "text",
)
DEMONSTRATION_FORMATS = (
    "prompt-completion",
    "messages",
    "text",
    "preference",
    "implicit-preference",
    "pointwise",
    "unpaired-preference",
    "hh-transcript",
)


def parse_pair(record: dict[str, Any], location: Location) -> PairExample:
    """A preference pair, with explicit or implicit prompt; HH pairs must share their prompt."""
    kind = detect_format(record)
    if kind == "implicit-preference":
        if isinstance(record["chosen"], list) or isinstance(record["rejected"], list):
            return _implicit_pair(record, location)
        (chosen_prompt, chosen), (rejected_prompt, rejected) = split_string_pair(record, location)
        if chosen_prompt != rejected_prompt:
            raise DataError(location, "rejected", "chosen and rejected differ before the last assistant turn")
        return PairExample(chosen_prompt, chosen, rejected, location)
    if kind != "preference" and not (_present(record, "chosen") or _present(record, "rejected")):
        if kind is None:
            raise no_format(record, location, PAIRWISE_FORMATS)
        expected = "; ".join(FORMATS[name] for name in PAIRWISE_FORMATS)
        raise DataError(
            location, None, f"a {FORMATS[kind]} record is not a preference pair; the pairwise methods read: {expected}",
            "train a point-wise method (PointwiseDataModule) or SFT on it, map your fields with columns:, or set "
            "on_bad_record: skip",
        )  # fmt: skip
    prompt = check_prompt(record.get("prompt"), location)
    return PairExample(
        prompt,
        check_completion(record.get("chosen"), location, "chosen"),
        check_completion(record.get("rejected"), location, "rejected"),
        location,
    )


def parse_answer(record: dict[str, Any], location: Location, kind: str) -> tuple[Prompt, Response]:
    """(prompt, response) of a single-answer record of format ``kind`` (see :data:`FORMATS`)."""
    if kind == "text":
        return None, check_text(record["text"], location, "text")
    if kind == "messages":
        return split_conversation(record["messages"], location)
    if kind == "hh-transcript":
        return split_hh(check_text(record["transcript"], location, "transcript"), location, "transcript")
    prompt = check_prompt(record.get("prompt"), location)
    field = "completion" if _present(record, "completion") else "response"
    return prompt, check_completion(record.get(field), location, field)


def record_score(
    record: dict[str, Any],
    location: Location,
    kind: str,
    score_range: tuple[float, float],
    lower_is_better: bool = False,
    default_score: float | None = None,
) -> float | None:
    """The normalised score of a single-answer record: its ``score`` (through ``score_range``, flipped
    when ``lower_is_better``), its ``label``, else ``default_score`` (None when there is none)."""
    if kind == "unpaired-preference":
        return check_label(record["label"], location)
    if kind in ("pointwise", "hh-transcript"):
        score = check_score(record.get("score"), location, score_range)
        return 1.0 - score if lower_is_better else score
    return default_score


def parse_pointwise(
    record: dict[str, Any],
    location: Location,
    score_range: tuple[float, float],
    lower_is_better: bool = False,
    default_score: float | None = None,
) -> list[Example]:
    """Point-wise examples from one record; a pair becomes two (chosen -> 1, rejected -> 0).

    A ``score`` is normalised through ``score_range`` to ``[0, 1]``, and turned into ``1 - score`` when
    ``lower_is_better``; a ``label`` is the binary score; a record with neither (prompt-completion,
    language modeling) takes ``default_score`` (its source's ``score``) or is a bad record. A
    ``{transcript, score}`` record is split at its last assistant turn.
    """
    kind = detect_format(record)
    if kind == "implicit-preference" and not isinstance(record["chosen"], list):
        (chosen_prompt, chosen), (rejected_prompt, rejected) = split_string_pair(
            record, location
        )  # HH: each side on its own
        return [Example(chosen_prompt, chosen, 1.0, location), Example(rejected_prompt, rejected, 0.0, location)]
    if kind in PAIRWISE_FORMATS:
        pair = parse_pair(record, location)
        return [Example(pair.prompt, pair.chosen, 1.0, location), Example(pair.prompt, pair.rejected, 0.0, location)]
    if kind is None:
        raise no_format(record, location, POINTWISE_FORMATS)
    prompt, response = parse_answer(record, location, kind)
    score = record_score(record, location, kind, score_range, lower_is_better, default_score)
    if score is None:
        raise DataError(
            location, "score", f"missing: a {FORMATS[kind]} record carries no score",
            "give the record a score, give its source a default score (score: 1.0 reads demonstrations as positives), "
            "or set on_bad_record: skip",
        )  # fmt: skip
    return [Example(prompt, response, score, location)]


def parse_demonstration(record: dict[str, Any], location: Location) -> Example:
    """A demonstration; from preference data the chosen side is the demonstration."""
    kind = detect_format(record)
    if kind == "implicit-preference" and isinstance(record["chosen"], list):
        pair = _implicit_pair(record, location)
        return Example(pair.prompt, pair.chosen, None, location)
    if kind in PAIRWISE_FORMATS or (kind is None and _present(record, "chosen")):
        if "prompt" not in record:
            chosen = check_text(record["chosen"], location, "chosen")
            if (
                HUMAN_MARKER in chosen or ASSISTANT_MARKER in chosen or not _present(record, "rejected")
            ):  # HH: the chosen transcript alone
                prompt, response = split_hh(chosen, location, "chosen")
            else:
                (prompt, response), _ = split_string_pair(record, location)
            return Example(prompt, response, None, location)
        return Example(
            check_prompt(record.get("prompt"), location),
            check_completion(record["chosen"], location, "chosen"),
            None,
            location,
        )
    if kind is None:
        raise no_format(record, location, DEMONSTRATION_FORMATS)
    return Example(*parse_answer(record, location, kind), None, location)
