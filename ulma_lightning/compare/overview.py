"""``ulma compare --plan``: what a grid will train and evaluate, which stages are shared, and an
estimated time, without training anything; and the ETA that progress lines show.

Estimates: a stage's time is the mean measured time of finished stages of the same method in the
output folder (``stage.json``; a stage resumed after a kill recorded only its last part and is left
out). A method not measured yet gets its default (:data:`DEFAULT_SECONDS`, 2 CPU cores, the tiny task
model) scaled by how the measured methods compared with their defaults, so a grid on a larger model
or machine is not estimated at the tiny model's speed. An evaluation (of a run or of a start model)
takes the mean ``eval_seconds`` of the runs finished under the current ``evaluation:`` settings,
scaled the same way before any has. A finished stage or evaluation counts 0; one recorded under other
evaluation settings is evaluated again and counts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ulma_lightning.compare.report import RESULT_FILE, evaluated, evaluation_key, init_folder, run_folder
from ulma_lightning.compare.spec import GridSpec
from ulma_lightning.compare.stages import Plan, stage_done

#: seconds per stage (by method, else by kind) and per evaluation on 2 quiet cores with the tiny task
#: model: v1's timed grid (docs/replication.md, "Where the time goes": 2 epochs a stage) halved for
#: protocol v2's one epoch; rough until a run in the output folder measures its own
DEFAULT_SECONDS = {
    "policy": 30.0,
    "reward": 25.0,
    "ppo": 120.0,
    "rloo": 120.0,
    "grpo": 120.0,
    "online_ulma": 120.0,
    "evaluation": 10.0,
}


def default_seconds(method: str, role: str) -> float:
    return DEFAULT_SECONDS.get(method, DEFAULT_SECONDS[role])


@dataclass
class Measured:
    """What finished stages and runs in an output folder took: the basis of every estimate."""

    stages: dict[str, float] = field(default_factory=dict)  # method -> mean seconds of its finished stages
    evaluation: float | None = None  # mean seconds of a finished run's evaluation
    factor: float = 1.0  # measured / default: the geometric mean over the measured methods

    def stage(self, method: str, role: str) -> float:
        return self.stages.get(method, default_seconds(method, role) * self.factor)

    def evaluate(self) -> float:
        return self.evaluation if self.evaluation is not None else DEFAULT_SECONDS["evaluation"] * self.factor


def measured_seconds(grid: GridSpec, plan: Plan, root: Path) -> Measured:
    """The mean times of the finished stages (per method) and evaluations under ``root``."""
    times: dict[str, list[float]] = {}
    defaults: dict[str, float] = {}
    for stage in plan.stages.values():
        record = stage_done(root, stage.key)
        if record is not None and record.get("seconds") is not None and not record.get("resumed_from"):
            times.setdefault(stage.spec.method, []).append(max(float(record["seconds"]), 1e-3))
            defaults[stage.spec.method] = default_seconds(stage.spec.method, stage.spec.role)
    means = {method: statistics.fmean(values) for method, values in times.items()}
    key = evaluation_key(grid)
    evaluations = [
        float(result["eval_seconds"])
        for instance in plan.instances
        if (result := evaluated(run_folder(root, instance.id) / RESULT_FILE, key)) is not None
        and result.get("eval_seconds") is not None
    ]
    return Measured(
        stages=means,
        evaluation=statistics.fmean(evaluations) if evaluations else None,
        factor=math.exp(statistics.fmean(math.log(means[m] / defaults[m]) for m in means)) if means else 1.0,
    )


def remaining_seconds(grid: GridSpec, plan: Plan, root: Path, instance_ids: list[str] | None = None) -> float:
    """Estimated seconds to finish the stages and evaluations of ``instance_ids`` (default: all) not yet
    done, their start models' evaluations included."""
    measured = measured_seconds(grid, plan, root)
    key = evaluation_key(grid)
    wanted = [i for i in plan.instances if instance_ids is None or i.id in instance_ids]
    stages = {k for i in wanted for k in i.stages if stage_done(root, k) is None}
    total = sum(measured.stage(plan.stages[k].spec.method, plan.stages[k].spec.role) for k in stages)
    evaluations = sum(1 for i in wanted if evaluated(run_folder(root, i.id) / RESULT_FILE, key) is None)
    evaluations += sum(
        1 for init in {i.init for i in wanted} if evaluated(init_folder(root, init) / RESULT_FILE, key) is None
    )
    return total + evaluations * measured.evaluate()


def clock(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def describe(grid: GridSpec, plan: Plan, root: Path, jobs: int = 1) -> str:
    """The plan as text: every stage (method, data, seed, the runs that share it, done or its estimate),
    the untrained models, the run instances and the estimated time left."""
    measured = measured_seconds(grid, plan, root)
    key_now = evaluation_key(grid)
    users: dict[str, list[str]] = {}
    for instance in plan.instances:
        for key in instance.stages:
            users.setdefault(key, []).append(instance.id)
    lines = [
        f"ulma compare --plan: {grid.path} -> {root}",
        f"{len(plan.stages)} stages, {len(plan.inits)} untrained models, {len(plan.instances)} runs ({len(grid.seeds)} "
        f"seeds {grid.seeds}, data draw {grid.data_seed})",
        "",
    ]
    lines.append("stages (in the order they train):")
    for key, stage in plan.stages.items():
        state = (
            "done"
            if stage_done(root, key) is not None
            else f"~{clock(measured.stage(stage.spec.method, stage.spec.role))}"
        )
        runs = sorted({u.rsplit("/", 1)[0] for u in users[key]})  # run/variant
        rows, variants = {r.split("/")[0] for r in runs}, {r.split("/")[1] for r in runs}
        named = ", ".join(runs) if len(runs) <= 6 else f"{len(rows)} rows x {len(variants)} variants"
        shared = f"shared by {len(users[key])} runs ({named})" if len(users[key]) > 1 else f"used by {users[key][0]}"
        start = f", from {stage.policy_from}" if stage.policy_from else ""
        reward = f", rewarded by {stage.reward_from}" if stage.reward_from else ""
        what = (
            f"the base ({stage.spec.method})"
            if stage.spec.sources is not None
            else f"{stage.spec.method} on {stage.spec.data}"
        )
        lines.append(f"  {key}: {what}{start}{reward}; {shared}; {state}")
    lines += ["", "runs (each evaluated on the test prompts):"]
    for instance in plan.instances:
        done = evaluated(run_folder(root, instance.id) / RESULT_FILE, key_now) is not None
        chain = " -> ".join(
            "base" if plan.stages[k].spec.sources is not None else plan.stages[k].spec.method for k in instance.stages
        )
        lines.append(f"  {instance.id}: {chain}{' (done)' if done else ''}")
    left = remaining_seconds(grid, plan, root)
    basis = (
        "measured stages in the output folder; methods not measured yet scaled by them"
        if measured.stages
        else "default times per method on 2 CPU cores"
    )
    lines += [
        "",
        f"estimated time left: {clock(left / max(1, jobs))} with {jobs} job(s) ({basis}; evaluations "
        f"~{clock(measured.evaluate())} each)",
    ]
    return "\n".join(lines)


def tune_overview(grid: GridSpec) -> str:
    """What ``--tune`` starts with: each tuning key, its values and candidate count (edge picks add more)."""
    from ulma_lightning.compare.tune import targets

    assert grid.tune is not None
    lines = [
        f"ulma compare --tune --plan: {grid.path}; tuning seeds {grid.tune.tuning_seeds}, validation prompts "
        f"{grid.tune.prompts}",
        "chains, tuned by depth:",
    ]
    total = candidates = 0
    for key, target in sorted(targets(grid).items(), key=lambda kv: (kv[1].depth, kv[0])):
        count = 1
        for values in target.values.values():
            count *= len(values)
        candidates += count
        total += count * len(grid.tune.tuning_seeds)
        shown = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in target.values.items())
        lines.append(f"  depth {target.depth} {key}: {shown} -> {count} candidates")
    lines.append(
        f"{total} trainings at first ({candidates} candidates x {len(grid.tune.tuning_seeds)} seeds); a pick on a "
        f"grid's edge adds up to {grid.tune.extend_edges} rounds per key"
    )
    seconds = total * (DEFAULT_SECONDS["policy"] + DEFAULT_SECONDS["evaluation"])
    lines.append(
        f"estimated: ~{clock(seconds / max(1, grid.jobs))} with {grid.jobs} job(s), at default times (chains' shared "
        "prefixes train once)"
    )
    return "\n".join(lines)


def eta_line(grid: GridSpec, plan: Plan, root: Path, todo: list[str], jobs: int) -> str:
    """``ETA ~12 min`` for the runs still to do."""
    return f"ETA ~{clock(remaining_seconds(grid, plan, root, todo) / max(1, jobs))}"
