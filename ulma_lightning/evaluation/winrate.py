"""Win rates between scored responses, and predictions files (JSONL) read back.

A predictions file (what ``ulma predict`` writes) holds one JSON object per prompt::

    {"index": 0, "prompt": ..., "response": "...", "reference_response": "...",
     "scores": {"demo": 0.75}, "reference_scores": {"demo": 1.0}}

A response *wins* when its score is higher than the other's; a tie counts as half a win.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def win_rate(scores: Sequence[float], other_scores: Sequence[float]) -> float:
    """Share of rows where ``scores`` beats ``other_scores``; ties count half. NaN for no rows."""
    if len(scores) != len(other_scores):
        raise ValueError(f"win_rate needs as many scores on each side, got {len(scores)} and {len(other_scores)}")
    if not scores:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores))
    return wins / len(scores)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions file; each must have ``prompt`` and ``response``."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{number}: malformed JSON ({exc.msg}); is this a predictions file from `ulma predict`?"
                ) from None
            for field in ("prompt", "response"):
                if field not in row:
                    raise ValueError(
                        f"{path}:{number}: field {field!r} missing; a predictions file has prompt and response per line"
                    )
            rows.append(row)
    return rows


def prompt_key(prompt: Any) -> str:
    """A canonical string for matching prompts across files (chat lists or strings)."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def match_rows(
    rows: list[dict[str, Any]], other: list[dict[str, Any]], other_name: str = "the other file"
) -> list[dict[str, Any]]:
    """For each row, the row of ``other`` with the same prompt (the n-th repeat matches the n-th repeat)."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in other:
        by_prompt.setdefault(prompt_key(row["prompt"]), []).append(row)
    matched = []
    for number, row in enumerate(rows, start=1):
        queue = by_prompt.get(prompt_key(row["prompt"]))
        if not queue:
            raise ValueError(
                f"row {number} (index {row.get('index', '?')}): its prompt is not in {other_name}; compare predictions "
                "made on the same prompts (same data.predict / data.test)"
            )
        matched.append(queue.pop(0))
    return matched


def score_of(row: dict[str, Any], name: str, *, reference: bool = False) -> float | None:
    """The score ``name`` of a row's response (or of its reference response), if recorded."""
    value = row.get("reference_scores" if reference else "scores", {}).get(name)
    return None if value is None else float(value)


def summarize(
    rows: list[dict[str, Any]], scorer_names: Sequence[str], other: list[dict[str, Any]] | None = None
) -> dict[str, dict[str, float]]:
    """Per scorer: ``mean``, ``reference_mean``, ``win_rate_vs_reference`` and (with ``other``)
    ``win_rate_vs_other``, from the scores recorded in the rows. Rows without a reference score are
    left out of the reference numbers; ``n`` is the number of rows.
    """
    matched = match_rows(rows, other) if other is not None else None
    out: dict[str, dict[str, float]] = {}
    for name in scorer_names:
        mine = [score_of(r, name) for r in rows]
        stats: dict[str, float] = {"n": float(len(rows))}
        present = [s for s in mine if s is not None]
        stats["mean"] = sum(present) / len(present) if present else math.nan
        scored = [(s, score_of(r, name, reference=True)) for s, r in zip(mine, rows)]
        pairs = [(a, b) for a, b in scored if a is not None and b is not None]
        if pairs:
            stats["reference_mean"] = sum(b for _, b in pairs) / len(pairs)
            stats["win_rate_vs_reference"] = win_rate([a for a, _ in pairs], [b for _, b in pairs])
        if matched is not None:
            both = [(a, score_of(m, name)) for a, m in zip(mine, matched)]
            theirs = [(a, b) for a, b in both if a is not None and b is not None]
            if len(theirs) != len(rows):
                raise ValueError(
                    f"the other predictions file lacks {name!r} scores on some rows; score both files with the same "
                    "scorers"
                )
            stats["other_mean"] = sum(b for _, b in theirs) / len(theirs) if theirs else math.nan
            stats["win_rate_vs_other"] = win_rate([a for a, _ in theirs], [b for _, b in theirs])
        out[name] = stats
    return out
