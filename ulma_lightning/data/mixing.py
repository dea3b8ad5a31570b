"""A split read from several sources, each with its own options, and mixed reproducibly.

A split (``train``, ``val``, ...) is one source string, or a list of sources, each a string or a
mapping ``{source, score, columns, score_range, on_bad_record, weight, samples}``:

* ``score``: the score (on the normalised ``[0, 1]`` scale) of the source's records that carry none
  (prompt-completion, language modeling): ``1.0`` reads a demonstration set as positives;
* ``columns``, ``score_range``, ``on_bad_record``: as the data module's, for this source only;
* ``samples``: exactly this many of the source's records per epoch (a seeded draw; above the
  source's size every record repeats as often as it fits, and the rest is drawn);
* ``weight``: the sources with a weight share the mix in proportion to their weights, as
  LLaMA-Factory's ``interleave_probs``: with ``mix_strategy: interleave_under`` the mix is as large as
  the weights allow without repeating a record (the first source to run out sets the size), with
  ``interleave_over`` as large as needed to use every record (the others repeat).

A source with neither ``weight`` nor ``samples`` gives all its records once. The mix is drawn once,
from ``split_seed``, when the split is set up (the same records every epoch, shuffled by the
sampler each epoch), so a resumed run sees the same data in the same order. Counts are of records:
a pair read as two point-wise samples counts once and its samples stay together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ulma_lightning.choices import check_choices
from ulma_lightning.options import check_numbers

MixStrategy = Literal["interleave_under", "interleave_over"]
#: what a split takes: a source string, or a list of strings and per-source option mappings
SplitSources = str | list[str | dict[str, Any]]


@dataclass(frozen=True)
class SourceSpec:
    """One source of a split and its own options (None: the data module's)."""

    source: str
    score: float | None = None
    columns: dict[str, str] | None = None
    score_range: tuple[float, float] | None = None
    on_bad_record: str | None = None
    weight: float | None = None
    samples: int | None = None


def source_specs(value: SplitSources | dict[str, Any] | None, split: str) -> list[SourceSpec] | None:
    """The sources of ``split`` as :class:`SourceSpec`; ValueError naming the split and the entry."""
    if value is None:
        return None
    entries = value if isinstance(value, (list, tuple)) else [value]
    if not entries:
        raise ValueError(f"data.{split} is an empty list; give it a source, or a list of sources")
    specs = []
    for i, entry in enumerate(entries):
        where = f"data.{split}" if isinstance(value, (str, dict)) else f"data.{split}[{i}]"
        if isinstance(entry, str):
            specs.append(SourceSpec(entry))
            continue
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: expected a source string or a mapping with 'source', got {type(entry).__name__}"
            )
        unknown = sorted(set(entry) - set(SourceSpec.__dataclass_fields__))
        if unknown or not isinstance(entry.get("source"), str):
            problem = (
                f"unknown option(s) {unknown}"
                if unknown
                else "no 'source' (a file, folder, hf://..., demo://... or task://...)"
            )
            raise ValueError(f"{where}: {problem}; a source takes {', '.join(SourceSpec.__dataclass_fields__)}")
        spec = SourceSpec(
            **{**entry, "score_range": tuple(entry["score_range"]) if entry.get("score_range") is not None else None}
        )
        try:
            check_numbers(
                score=(spec.score, "in [0, 1]"), weight=(spec.weight, "finite and > 0"), samples=(spec.samples, ">= 1")
            )
        except ValueError as err:
            raise ValueError(f"{where} ({spec.source}): {err}") from None
        if spec.weight is not None and spec.samples is not None:
            raise ValueError(f"{where} ({spec.source}): give weight or samples, not both")
        check_choices(f"{where} ({spec.source})", on_bad_record=(spec.on_bad_record, (None, "error", "skip")))
        if spec.score_range is not None and not (
            len(spec.score_range) == 2 and spec.score_range[0] < spec.score_range[1]
        ):
            raise ValueError(
                f"{where} ({spec.source}): score_range must be [low, high] with low < high, got "
                f"{list(spec.score_range)}"
            )
        specs.append(spec)
    return specs


def describe(specs: Sequence[SourceSpec] | None) -> str | None:
    """The sources of a split as one string (for messages, and for ``source_of``)."""
    if specs is None:
        return None
    return " + ".join(spec.source for spec in specs)


def records_of(examples: Sequence[Any]) -> list[list[Any]]:
    """Examples grouped by record (consecutive examples with one location)."""
    groups: list[list[Any]] = []
    for example in examples:
        if groups and groups[-1][0].location == example.location:
            groups[-1].append(example)
        else:
            groups.append([example])
    return groups


def mix_sizes(
    sizes: Sequence[int], specs: Sequence[SourceSpec], strategy: MixStrategy = "interleave_under"
) -> list[int]:
    """Records drawn from each source per epoch (see the module docstring)."""
    counts = [spec.samples if spec.samples is not None else size for spec, size in zip(specs, sizes)]
    weighted = [i for i, spec in enumerate(specs) if spec.weight is not None]
    if weighted:
        total_weight = sum(specs[i].weight for i in weighted)  # type: ignore[misc]
        ratios = [sizes[i] / (specs[i].weight / total_weight) for i in weighted]  # type: ignore[operator]
        size = min(ratios) if strategy == "interleave_under" else max(ratios)
        for i in weighted:
            counts[i] = max(1, round(size * specs[i].weight / total_weight))  # type: ignore[operator]
            if strategy == "interleave_under":
                counts[i] = min(counts[i], sizes[i])  # rounding never repeats a record
    return counts


def draw(groups: list[list[Any]], count: int, generator: torch.Generator) -> list[list[Any]]:
    """``count`` records of ``groups``: every record ``count // len`` times, the rest a seeded draw."""
    repeats, rest = divmod(count, len(groups))
    order = torch.randperm(len(groups), generator=generator).tolist()
    chosen = sorted(order[:rest])  # kept in file order
    return [g for _ in range(repeats) for g in groups] + [groups[i] for i in chosen]


def mix(
    parts: Sequence[list[Any]], specs: Sequence[SourceSpec], seed: int, strategy: MixStrategy = "interleave_under"
) -> tuple[list[Any], list[int]]:
    """The examples of a split mixed from its sources' ``parts``, and the records drawn from each."""
    groups = [records_of(part) for part in parts]
    counts = mix_sizes([len(g) for g in groups], specs, strategy)
    mixed: list[Any] = []
    for i, (source_groups, count) in enumerate(zip(groups, counts)):
        if count == len(source_groups):
            drawn = source_groups
        else:
            drawn = draw(source_groups, count, torch.Generator().manual_seed(seed * 1000 + i))
        mixed += [example for group in drawn for example in group]
    return mixed, counts
