"""Demonstrations (prompt-completion, language modeling, the chosen side of pairs) for supervised fine-tuning."""

from __future__ import annotations

from typing import Any

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.data.errors import SkipReport
from ulma_lightning.data.records import Example, detect_format, parse_demonstration, record_score
from ulma_lightning.data.sources import Location

SCORED = ("pointwise", "unpaired-preference", "hh-transcript")  # the formats that carry their own score


class DemonstrationDataModule(AlignmentDataModule):
    """Demonstrations for :class:`~ulma_lightning.SFTModule`: prompt-completion ``{prompt, completion}``
    (or ``response``) and language modeling ``{messages}`` (the last, assistant, turn is trained on) or
    ``{text}`` (all of it), standard or conversational.

    From preference data ``{prompt, chosen, rejected}``, ``{chosen, rejected}`` (conversations with
    implicit prompt) and HH transcripts the chosen side is the demonstration (the paper's SFT set).
    Point-wise records ``{prompt, response, score}`` and unpaired preference ``{prompt, completion,
    label}`` are read as demonstrations; set ``min_score`` to keep only those scoring at least that
    much (e.g. ``1.0`` for the positives of ``demo://binary``, or the ``label: true`` ones); the
    others are left out and counted in the log.

    Args:
        min_score: keep a record that carries a ``score`` only if its score (normalised by
            ``score_range``) is at least this; None keeps every record.
        score_range: the declared range of ``score`` (used with ``min_score``).
        **kwargs: see :class:`~ulma_lightning.AlignmentDataModule`.
    """

    scored_options = ("score", "score_range")  # with min_score

    def __init__(
        self, *args: Any, min_score: float | None = None, score_range: tuple[float, float] = (0.0, 1.0), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.min_score = min_score
        self.score_range = tuple(score_range)
        self._report = SkipReport("records")  # where parse_record counts records below min_score

    def parse_record(self, record: dict[str, Any], location: Location) -> list[Example]:
        if self.min_score is not None:
            kind = detect_format(record)
            default = self.reading.score if self.reading is not None else None
            score = record_score(record, location, kind, self.option("score_range")) if kind in SCORED else default
            if score is not None and score < self.min_score:
                self._report.add(f"score below min_score={self.min_score}", str(location))
                return []
        return [parse_demonstration(record, location)]

    def read_examples(self, source: str, split: str, report: SkipReport) -> list[Any]:
        self._report = report  # parse_record counts the records left out by min_score here
        return super().read_examples(source, split, report)

    def build_features(self, examples: list[Example], report: SkipReport) -> list[dict[str, Any]]:
        items = []
        for example, sequence in zip(
            examples, self.encode_examples([e.prompt for e in examples], [e.response for e in examples])
        ):
            if sequence is None:
                report.add("no response tokens left after truncation to max_length", str(example.location))
                continue
            input_ids, labels = sequence
            items.append({"input_ids": input_ids, "labels": labels, "length": len(input_ids)})
        return items
