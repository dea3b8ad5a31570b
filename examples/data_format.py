"""A new data format: thumbs-up/down feedback ``{question, answer, thumbs: "up" | "down"}``.

Plain renames need no code (``columns: {prompt: question, response: answer}`` and ``score_range``
on any source, README "Data"); a value that must be translated does. This data module reads
``thumbs`` as the binary score and refuses anything else with the file, line and field. Run it with
``PYTHONPATH=. ulma fit --config examples/data_format.yaml`` (docs/extending.md).
"""

from __future__ import annotations

from typing import Any

from ulma_lightning import PointwiseDataModule
from ulma_lightning.data.errors import DataError
from ulma_lightning.data.records import Example, check_prompt, check_text
from ulma_lightning.data.sources import Location

THUMBS = {"up": 1.0, "down": 0.0}


def parse_thumbs(record: dict[str, Any], location: Location) -> Example:
    """One point-wise example from a thumbs record; a bad field is a :class:`DataError` naming it."""
    prompt = check_prompt(record.get("question"), location, "question")
    answer = check_text(record.get("answer"), location, "answer")
    thumbs = record.get("thumbs")
    if thumbs not in THUMBS:
        raise DataError(location, "thumbs", f"expected 'up' or 'down', got {thumbs!r}")
    return Example(prompt, answer, THUMBS[thumbs], location)


class ThumbsDataModule(PointwiseDataModule):
    """Point-wise feedback as thumbs up/down (:func:`parse_thumbs`); every option of
    :class:`~ulma_lightning.PointwiseDataModule` applies (sources, mixing, ``on_bad_record``, ...)."""

    def parse_record(self, record: dict[str, Any], location: Location) -> list[Example]:
        return [parse_thumbs(record, location)]
