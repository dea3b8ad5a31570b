"""Paired effects with bootstrap confidence intervals, and the verdict rule of protocol v2.

A claim "A beats B" is judged on the paired difference ``d[s, p] = A[s, p] - B[s, p]`` of the two
rows' per-prompt scores on the same prompt ``p`` under the same seed ``s``. The effect is the mean of
``d``; its 95% interval is a two-level percentile bootstrap: each resample draws the seeds with
replacement and, independently, the prompts with replacement (the same prompts for every seed, as
they are the same test prompts), and takes the mean of ``d`` over the drawn grid. So the interval
carries both the seed-to-seed variation of training and the prompt-to-prompt variation of the test
set. A metric with one value per run (golden perplexity) has one column: its interval is over seeds.

The verdict needs two sets, each with its own interval: the main set (seeds 0-2, data draw 0) and
a held-out set (other seeds and another data draw), as docs/replication.md fixes in advance:

* ``beats``: *supported* when both intervals lie above 0; *contradicted* when either lies below 0;
  otherwise *not supported* (an interval that holds 0);
* ``at_least`` (non-inferiority, margin ``m``): *supported* when both intervals lie above ``-m``;
  *contradicted* when either lies below ``-m``; otherwise *not supported*;
* ``equivalent`` (margin ``m``): *supported* when both intervals lie inside ``(-m, m)``;
  *contradicted* when either lies wholly outside it; otherwise *not supported*.

With only the main set, the verdict is at most *supported on the main set only*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ulma_lightning.choices import check_choices

Kind = Literal["beats", "at_least", "equivalent"]
KINDS = ("beats", "at_least", "equivalent")


@dataclass(frozen=True)
class Effect:
    """A paired effect: the mean difference and its confidence interval (``low``, ``high``)."""

    mean: float
    low: float
    high: float
    seeds: int
    prompts: int

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "not run"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


NO_EFFECT = Effect(math.nan, math.nan, math.nan, 0, 0)


def paired_effect(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 4000, confidence: float = 0.95, seed: int = 0
) -> Effect:
    """The mean of ``a - b`` (arrays of shape ``(seeds, prompts)``, paired cell by cell) and its
    two-level percentile bootstrap interval (seeds and prompts resampled independently)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired scores must be two arrays of one shape (seeds, prompts), got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    seeds, prompts = d.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, seeds, size=(resamples, seeds))
    cols = rng.integers(0, prompts, size=(resamples, prompts))
    # mean over the drawn grid = mean over drawn rows of (mean over drawn columns of that row)
    row_means = np.stack(
        [d[:, c].mean(axis=1) for c in cols]
    )  # (resamples, seeds): each row's mean on the drawn prompts
    means = np.take_along_axis(row_means, rows, axis=1).mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Effect(float(d.mean()), float(low), float(high), seeds, prompts)


def _side(effect: Effect, kind: Kind, margin: float) -> str:
    """``yes``, ``no`` or ``open`` for one set's interval."""
    if kind == "beats":
        return "yes" if effect.low > 0 else "no" if effect.high < 0 else "open"
    if kind == "at_least":
        return "yes" if effect.low > -margin else "no" if effect.high < -margin else "open"
    inside = -margin < effect.low and effect.high < margin
    outside = effect.low >= margin or effect.high <= -margin
    return "yes" if inside else "no" if outside else "open"


def verdict(main: Effect, heldout: Effect | None, kind: Kind = "beats", margin: float = 0.0) -> str:
    """The verdict of a claim from its main-set and held-out-set effects (rule in the module docstring)."""
    check_choices("claim", kind=(kind, KINDS))
    if math.isnan(main.mean):
        return "not run"
    sides = [_side(main, kind, margin)]
    if heldout is not None and not math.isnan(heldout.mean):
        sides.append(_side(heldout, kind, margin))
    if "no" in sides:
        return "contradicted"
    if sides == ["yes", "yes"]:
        return "supported"
    if sides == ["yes"]:
        return "supported on the main set only (no held-out set)"
    return "not supported"
