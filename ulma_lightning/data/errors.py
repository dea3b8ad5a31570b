"""Where a record came from (:class:`Location`), the error raised for a bad input record, and the tally of records
skipped instead."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from ulma_lightning.options import UserError

log = logging.getLogger("ulma_lightning.data")

OnBadRecord = Literal["error", "skip"]


@dataclass(frozen=True)
class Location:
    """Where a record came from: ``source`` plus a 1-based ``line`` (text files) or 0-based ``row``
    (neither for the source as a whole)."""

    source: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source} (record {self.row})"
        return self.source


SKIP_HINT = "fix the record, or set on_bad_record: skip to skip such records"


class DataError(UserError):
    """Input that cannot be used: says where (file:line or record), which field, what is wrong, and
    (``hint``) how to fix it; the default hint suits a bad record."""

    def __init__(self, location: Location, field: str | None, problem: str, hint: str = SKIP_HINT) -> None:
        self.location = location
        self.field = field
        self.problem = problem
        where = f"{location}: field {field!r}: " if field else f"{location}: "
        super().__init__(f"{where}{problem} ({hint})")


class SkipReport:
    """Counts of skipped records by reason, for one split."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log(self) -> None:
        for reason, count in sorted(self.counts.items()):
            log.warning(
                "%s split: skipped %d record(s): %s (first: %s)", self.split, count, reason, self.examples[reason]
            )

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
