"""``ulma compare --config GRID.yaml --tune``: choose each stage's hyper-parameters by one rule.

The rule (the grid's ``tune:`` section, the same for every method): every policy stage of every run
is tuned *in its chain*, under its tuning key (:func:`~ulma_lightning.compare.spec.tuning_keys`:
``sft``, ``dpo``, ``sft>dpo``, ``sft>reward>ppo``), so DPO after SFT is tuned as DPO after SFT, from
the SFT model already tuned. Chains are tuned by depth: first every one-stage chain, then the
two-stage chains from the chosen first stages, and so on. A key's candidates are every combination
of its values (``tune.grid``, with ``tune.methods.<key or method>`` over it) that its module takes
(``beta`` is skipped for SFT, for example), each trained on ``tune.variant`` with every tuning seed
(``tune.seeds``); the pick is the combination whose greedy generations on the *validation* prompts
(``tune.prompts``) have the best mean ground-truth score over those seeds (ties: the first in grid
order). A numeric pick on the first or last value of a list with two or more values extends that
list by the next value of its step (``tune.extend_edges`` times at most) and the key is tuned again.
Reward-model stages are not tuned (their options are the grid's).

The candidates are an ordinary grid, run by :func:`~ulma_lightning.compare.runner.compare` into
``OUTPUT/tune/`` (its ``results.md`` is the table; stages shared by candidates train once); the picks
are written to ``OUTPUT/tune/tuned.yaml`` as a ``tuned:`` section to commit into the grid, where every
stage with that tuning key then uses them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ulma_lightning.compare.spec import GridError, GridSpec, RunSpec, StageSpec, _accepts, tuning_keys
from ulma_lightning.importing import import_object


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


@dataclass
class Candidate:
    """One combination of option values for one tuning key, as a single-variant run."""

    key: str
    run: RunSpec
    chosen: dict[str, Any]


@dataclass
class Target:
    """A stage to tune: its key, the chain that ends with it, and its candidate values."""

    key: str
    stages: list[StageSpec]
    run: RunSpec
    values: dict[str, list[Any]]

    @property
    def depth(self) -> int:
        return len(self.key.split(">"))


def targets(grid: GridSpec) -> dict[str, Target]:
    """Every policy stage to tune, by tuning key (the first run that reaches it gives its chain)."""
    assert grid.tune is not None
    out: dict[str, Target] = {}
    for run in grid.runs:
        for index, (stage, key) in enumerate(zip(run.stages, tuning_keys(run.stages))):
            if key in out or stage.role != "policy" or stage.sources is not None:
                continue
            cls = import_object(stage.module_class)
            values = {**grid.tune.grid, **grid.tune.methods.get(stage.method, {}), **grid.tune.methods.get(key, {})}
            values = {k: list(v) for k, v in values.items() if _accepts(cls, k)}
            out[key] = Target(key, run.stages[: index + 1], run, values)
    return out


def _run_name(key: str, chosen: dict[str, Any]) -> str:
    return key.replace(">", "-") + "[" + ",".join(f"{_short(k)}={v}" for k, v in chosen.items()) + "]"


def candidates_of(target: Target, variant: str, tuned: dict[str, dict[str, Any]]) -> list[Candidate]:
    """Every combination of ``target``'s values, in grid order; the stages before it take their picks
    (``tuned``), written into their overrides so a candidate's stages never change once planned."""
    out = []
    keys = list(target.values)
    chain = tuning_keys(target.stages)
    before = [
        replace(s, overrides={**tuned.get(k, {}), **s.overrides}) if k in tuned else s
        for s, k in zip(target.stages[:-1], chain)
    ]
    for values in itertools.product(*(target.values[k] for k in keys)):
        chosen = dict(zip(keys, values))
        last = target.stages[-1]
        stages = [*before, replace(last, overrides={**last.overrides, **chosen})]
        name = _run_name(target.key, chosen)
        out.append(
            Candidate(
                target.key, RunSpec(name, name, stages, [variant], dict(target.run.overrides), target.run.line), chosen
            )
        )
    return out


def tune_grid(grid: GridSpec, runs: list[RunSpec]) -> GridSpec:
    """The grid of ``runs`` (candidates): the tuning seeds, the validation prompts, no golden perplexity
    or KL, and no ``tuned:`` values of the grid file (a candidate carries every value it uses)."""
    if grid.tune is None:
        raise GridError(
            f"{grid.path}: --tune needs a `tune:` section (prompts: validation prompts; grid: option -> values)"
        )
    evaluation = replace(
        grid.evaluation,
        prompts=grid.tune.prompts,
        golden=None,
        kl_max_new_tokens=0,
        max_prompts=grid.tune.max_prompts,
        baseline=None,
    )
    return replace(
        grid, name=f"{grid.name}-tune", seeds=grid.tune.tuning_seeds, runs=runs, evaluation=evaluation, tuned={}
    )


def mean_scores(results: dict[str, Any], seeds: list[int]) -> dict[str, float]:
    """Run name -> mean validation score over ``seeds`` (only runs finished on every seed)."""
    per_run: dict[str, dict[int, float]] = {}
    for r in results["runs"]:
        score = r["metrics"].get("score") if r["status"] == "ok" else None
        if score is not None and not math.isnan(score):
            per_run.setdefault(r["run"], {})[r["seed"]] = float(score)
    return {
        name: statistics.fmean(by_seed[s] for s in seeds)
        for name, by_seed in per_run.items()
        if all(s in by_seed for s in seeds)
    }


def pick(options: list[Candidate], scores: dict[str, float]) -> Candidate | None:
    """The candidate with the best mean score (ties: the first in grid order); None if none finished."""
    finished = [(scores[c.run.name], -i, c) for i, c in enumerate(options) if c.run.name in scores]
    return max(finished, key=lambda t: t[:2])[2] if finished else None


def next_value(values: list[Any], at_start: bool) -> Any | None:
    """The value one step beyond the first (``at_start``) or last of ``values``: the geometric step for
    positive numbers, else the arithmetic one; None where there is no numeric step (or it would reach
    zero or a negative value from positive ones)."""
    if len(values) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    edge, neighbour = (values[0], values[1]) if at_start else (values[-1], values[-2])
    if edge == neighbour:
        return None
    if edge > 0 and neighbour > 0:
        value = edge * (edge / neighbour)
        return float(f"{value:.3g}") if isinstance(edge, float) or isinstance(value, float) else value
    value = edge + (edge - neighbour)
    return None if min(values) >= 0 and value < 0 else value


def extend_edges(target: Target, best: dict[str, Any]) -> bool:
    """Extend each of ``target``'s value lists whose pick sits on its edge; whether any grew."""
    grew = False
    for key, values in target.values.items():
        if key not in best or len(values) < 2 or best[key] not in (values[0], values[-1]):
            continue
        at_start = best[key] == values[0]
        value = next_value(values, at_start)
        if value is None or value in values:
            continue
        target.values[key] = [value, *values] if at_start else [*values, value]
        grew = True
    return grew


Runner = Callable[[GridSpec], dict[str, Any]]


def tune_chains(grid: GridSpec, run: Runner) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Tune every target by depth with ``run`` (trains a candidates grid, returns its results); returns
    the picks by tuning key and a log of each round (key, values tried, pick, score, extended)."""
    assert grid.tune is not None
    found = targets(grid)
    tuned: dict[str, dict[str, Any]] = {}
    runs: list[RunSpec] = []
    log: list[dict[str, Any]] = []
    for depth in sorted({t.depth for t in found.values()}):
        pending = [t for t in found.values() if t.depth == depth]
        extensions = 0
        while pending:
            options = {t.key: candidates_of(t, grid.tune.variant, tuned) for t in pending}
            known = {r.name for r in runs}
            runs += [c.run for cs in options.values() for c in cs if c.run.name not in known]
            results = run(tune_grid(grid, runs))
            scores = mean_scores(results, grid.tune.tuning_seeds)
            again = []
            for target in pending:
                best = pick(options[target.key], scores)
                if best is None:
                    log.append(
                        {
                            "key": target.key,
                            "values": dict(target.values),
                            "pick": None,
                            "score": None,
                            "extended": False,
                        }
                    )
                    continue
                tuned[target.key] = best.chosen
                extended = extensions < grid.tune.extend_edges and extend_edges(target, best.chosen)
                log.append(
                    {
                        "key": target.key,
                        "values": {k: list(v) for k, v in target.values.items()},
                        "pick": best.chosen,
                        "score": scores[best.run.name],
                        "extended": extended,
                    }
                )
                if extended:
                    again.append(target)
            extensions += 1
            pending = again
    return tuned, log


def write_tuned(
    tuned: dict[str, dict[str, Any]], path: Path, command: str, log: list[dict[str, Any]] | None = None
) -> None:
    """``tuned.yaml``: the ``tuned:`` section to commit into the grid, with the rounds that chose it."""
    header = (
        f"# Chosen by `{command}` (mean validation score over the tuning seeds; table: {path.parent / 'results.md'}).\n"
        "# Paste into the grid file.\n"
    )
    for entry in log or []:
        note = " (on the grid's edge: extended and tuned again)" if entry["extended"] else ""
        header += f"#   {entry['key']}: tried {entry['values']}; pick {entry['pick']} (score {entry['score']}){note}\n"
    path.write_text(header + yaml.safe_dump({"tuned": tuned}, sort_keys=False))
