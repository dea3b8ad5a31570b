"""``ulma compare --config GRID.yaml --tune``: choose each method's hyper-parameters by one rule.

The rule (the grid's ``tune:`` section, the same for every method): for each method (the last stage
of the shortest run that ends with it), train every combination of the ``tune.grid`` values that its
module takes (``beta`` is skipped for SFT, for example) on ``tune.variant`` with ``tune.seed``, and
keep the combination whose greedy generations on the *validation* prompts (``tune.prompts``) have
the best mean ground-truth score (ties: the first in grid order). The candidates are an ordinary
grid, run by :func:`~ulma_lightning.compare.runner.compare` into ``OUTPUT/tune/`` (its
``results.md`` is the table); the choice is written to ``OUTPUT/tune/tuned.yaml`` as a ``tuned:``
section to commit into the grid, where every stage of that method then uses it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ulma_lightning.compare.spec import GridError, GridSpec, RunSpec, _accepts, _import


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


Candidate = tuple[RunSpec, dict[str, Any]]  # a run and the option values it tries


def candidates(grid: GridSpec) -> dict[str, list[Candidate]]:
    """Per method, one single-variant run per combination of the tune values its module takes."""
    assert grid.tune is not None
    out: dict[str, list[Candidate]] = {}
    for run in sorted(grid.runs, key=lambda r: len(r.stages)):
        last = run.stages[-1]
        if last.method in out or last.role != "policy":
            continue
        cls = _import(last.module_class)
        keys = [k for k in grid.tune.grid if _accepts(cls, k)]
        out[last.method] = []
        for values in itertools.product(*(grid.tune.grid[k] for k in keys)):
            chosen = dict(zip(keys, values))
            name = f"{last.method}[" + ",".join(f"{_short(k)}={v}" for k, v in chosen.items()) + "]"
            stages = [*run.stages[:-1], replace(last, overrides={**last.overrides, **chosen})]
            out[last.method].append((RunSpec(name, name, stages, [grid.tune.variant], dict(run.overrides), run.line), chosen))
    return out


def tune_grid(grid: GridSpec) -> tuple[GridSpec, dict[str, list[Candidate]]]:
    """The grid of candidates: seed ``tune.seed``, the validation prompts, no golden perplexity or KL."""
    if grid.tune is None:
        raise GridError(f"{grid.path}: --tune needs a `tune:` section (prompts: validation prompts; grid: option -> values)")
    per_method = candidates(grid)
    evaluation = replace(grid.evaluation, prompts=grid.tune.prompts, golden=None, kl_max_new_tokens=0, max_prompts=grid.tune.max_prompts, baseline=None)
    runs = [run for options in per_method.values() for run, _ in options]
    return replace(grid, name=f"{grid.name}-tune", seeds=[grid.tune.seed], runs=runs, evaluation=evaluation), per_method


def choose(results: dict[str, Any], per_method: dict[str, list[Candidate]]) -> dict[str, dict[str, Any]]:
    """Per method, the option values of the candidate with the best validation score (ties: the first)."""
    scores = {r["run"]: r["metrics"].get("score", math.nan) for r in results["runs"] if r["status"] == "ok"}
    tuned: dict[str, dict[str, Any]] = {}
    for method, options in per_method.items():
        finished = [(scores[run.name], -i, chosen) for i, (run, chosen) in enumerate(options) if not math.isnan(scores.get(run.name, math.nan))]
        if finished:
            tuned[method] = max(finished, key=lambda t: t[:2])[2]
    return tuned


def write_tuned(tuned: dict[str, dict[str, Any]], path: Path, command: str) -> None:
    """``tuned.yaml``: the ``tuned:`` section to commit into the grid."""
    header = f"# Chosen by `{command}` (validation score; table: {path.parent / 'results.md'}).\n# Paste into the grid file.\n"
    path.write_text(header + yaml.safe_dump({"tuned": tuned}, sort_keys=False))
