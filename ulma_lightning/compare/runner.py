"""``ulma compare --config GRID.yaml [--quick] [--output DIR] [--overwrite] [--only NAME]``: train and
evaluate every run of a grid, then write ``results.md``, ``results.json`` and PNG plots into ``DIR``
(new, empty, or an earlier compare's; ``--overwrite`` for another folder). Exit status 1 when a run failed.

Layout of ``DIR``: ``stages/<stage>/`` (TensorBoard logs, checkpoints, the exported ``hf_model``,
``command.txt`` and ``stage.json`` once done), ``runs/<run>/<variant>/seed<S>/`` (``result.json``
once evaluated, ``predictions.jsonl``, and links ``model`` and ``tensorboard_<i>_<method>`` to its
stages), and the results files. Started again, ``ulma compare`` skips finished runs and stages and
resumes a stage that was killed from its last checkpoint. A run that fails is recorded with its
error; the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ulma_lightning.compare.metrics import Evaluator
from ulma_lightning.compare.overview import describe, eta_line, tune_overview
from ulma_lightning.compare.parallel import run_parallel, stage_lock
from ulma_lightning.compare.plots import write_plots
from ulma_lightning.compare.report import (
    RESULT_FILE,
    collect,
    evaluated,
    evaluation_key,
    init_folder,
    run_folder,
    write_results,
)
from ulma_lightning.compare.spec import GridError, GridSpec, load_grid
from ulma_lightning.compare.stages import (
    Instance,
    Plan,
    build_init,
    failure,
    plan_grid,
    quiet_output,
    read_json,
    train_stage,
    write_json,
)
from ulma_lightning.compare.tune import tune_chains, write_tuned


def _link(link: Path, target: str) -> None:
    """``link`` -> ``target`` as a relative symlink (replaced if present)."""
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


class Runner:
    """Runs the instances of a plan into ``root``, sharing stages and untrained models.

    Args:
        grid: the checked grid.
        plan: its stages and run instances (:func:`~ulma_lightning.compare.stages.plan_grid`).
        root: the output folder.
        launcher: ``inprocess`` (each ``ulma fit`` in this process) or ``subprocess``.
    """

    def __init__(self, grid: GridSpec, plan: Plan, root: Path, launcher: str = "inprocess") -> None:
        self.grid, self.plan, self.root, self.launcher = grid, plan, root, launcher
        self.restore_output = quiet_output() if grid.overrides.get("trainer.enable_progress_bar") is False else None
        # quiet in this process and each --jobs worker: compare's progress lines are the display
        self.stage_records: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self._evaluator: Evaluator | None = None
        uses: dict[str, int] = {}
        for instance in plan.instances:
            for key in instance.stages:
                uses[key] = uses.get(key, 0) + 1
        self.shared = {key for key, n in uses.items() if n > 1}
        self.evaluation_key = evaluation_key(grid)

    def finished(self, path: Path) -> bool:
        """Whether ``path`` (a ``result.json``) records a success under the current evaluation settings
        (a run evaluated with other settings is evaluated again; its stages are not retrained)."""
        return evaluated(path, self.evaluation_key) is not None

    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.grid.evaluation)
        return self._evaluator

    def stage(self, key: str) -> dict[str, Any]:
        """Train stage ``key`` (and those it starts from) unless done; its record."""
        if key in self.stage_records:
            return self.stage_records[key]
        if key in self.failed:
            raise RuntimeError(f"stage {key} failed earlier in this invocation: {self.failed[key].splitlines()[0]}")
        stage = self.plan.stages[key]
        exports = {k: self.stage(k)["export"] for k in (stage.policy_from, stage.reward_from) if k is not None}
        try:
            with stage_lock(self.root, key):  # --jobs: another worker may be training it
                record = train_stage(stage, self.root, exports, self.launcher, self.grid.keep_checkpoints)
        except Exception as exc:
            self.failed[key] = failure(exc)
            raise
        self.stage_records[key] = record
        return record

    def reference(self, instance: Instance) -> str | None:
        """The export the run's last stage started from and was regularised towards (its own reference:
        the base for a one-step row, the SFT model for SFT then DPO); None: the untrained model."""
        start = self.plan.stages[instance.stages[-1]].policy_from
        return self.stage(start)["export"] if start is not None else None

    def untrained(self, key: str) -> dict[str, Any]:
        """The untrained model ``key``: exported and evaluated once."""
        with stage_lock(self.root, key):
            record = build_init(self.plan.inits[key], self.root)
            folder = init_folder(self.root, key)
            if not self.finished(folder / RESULT_FILE):
                metrics = self.evaluator.evaluate(record["export"], record["export"], folder)
                write_json(
                    folder / RESULT_FILE,
                    {
                        "status": "ok",
                        "key": key,
                        "export": record["export"],
                        "metrics": metrics,
                        "evaluation_key": self.evaluation_key,
                    },
                )
        return record

    def run(self, instance: Instance) -> dict[str, Any]:
        """Train, evaluate and record one run instance; a failure is recorded, not raised."""
        folder = run_folder(self.root, instance.id)
        records: list[dict[str, Any]] = []
        started = time.perf_counter()
        try:
            for key in instance.stages:
                records.append({**self.stage(key), "shared": key in self.shared})
            init = self.untrained(instance.init)
            self.evaluator.seed = instance.seed
            evaluated = time.perf_counter()
            reference = self.reference(instance) or init["export"]
            metrics: dict[str, float | None] = {**self.evaluator.evaluate(records[-1]["export"], reference, folder)}
            metrics["train_seconds"] = sum(r["seconds"] for r in records)
            metrics["tokens_per_sec"] = records[-1].get("tokens_per_sec")
            metrics["reward_accuracy"] = next(
                (r.get("reward_accuracy") for r in records if r.get("role") == "reward"), None
            )
            result = {
                "status": "ok",
                "metrics": metrics,
                "eval_seconds": time.perf_counter() - evaluated,
                "model": records[-1]["export"],
            }
            _link(folder / "model", records[-1]["export"])
            for index, record in enumerate(records, start=1):
                _link(folder / f"tensorboard_{index}_{record['method']}", record["tensorboard"])
        except Exception as exc:  # recorded in results.md; the other runs go on
            result = {"status": "failed", "error": failure(exc), "metrics": {}}
        result.update(stages=records, seconds=time.perf_counter() - started, evaluation_key=self.evaluation_key)
        write_json(folder / RESULT_FILE, result)
        return result


def select(plan: Plan, only: str | None) -> list[Instance]:
    """The instances ``--only`` names: a run name, or one instance ``run/variant/seedS``."""
    if not only:
        return list(plan.instances)
    chosen = [i for i in plan.instances if only in (i.run.name, i.id) or i.id.startswith(only.rstrip("/") + "/")]
    if not chosen:
        names = sorted({i.run.name for i in plan.instances})
        raise GridError(
            f"--only {only!r} matches no run; runs are {names} (or RUN/VARIANT/seedS, e.g. {plan.instances[0].id})"
        )
    return chosen


LOCK_FILE = ".ulma-compare.lock"


def _made_by_compare(root: Path) -> bool:
    """Whether ``root`` holds what ``ulma compare`` writes: its lock file (kept between runs), its
    stage locks, a ``results.json`` it wrote (folders of versions before the lock file was kept), or
    only the ``tune/`` folder that ``--tune`` writes into the same ``--output``."""
    if (root / LOCK_FILE).exists() or (root / "stages" / ".locks").is_dir():
        return True
    if {p.name for p in root.iterdir()} == {"tune"} and (root / "tune").is_dir() and _made_by_compare(root / "tune"):
        return True
    results = read_json(root / "results.json")
    return results is not None and str(results.get("command", "")).startswith("ulma compare")


def check_output(root: Path, overwrite: bool = False) -> None:
    """Refuse an output folder that holds files ``ulma compare`` did not write (a user's own
    ``results.md`` would be replaced), unless ``overwrite``; a folder of an earlier compare is resumed."""
    if not (root.exists() or root.is_symlink()):
        return
    if not root.is_dir():
        raise GridError(f"--output {root} is a file; ulma compare writes a folder there. Choose another --output")
    if overwrite or not any(root.iterdir()) or _made_by_compare(root):
        return
    raise GridError(
        f"--output {root} is a folder that ulma compare did not write, and it is not empty: compare would replace "
        "files in it (results.md, results.json, the plots). Choose a new or empty folder, or pass --overwrite to "
        "write there anyway"
    )


@contextlib.contextmanager
def output_lock(root: Path) -> Iterator[None]:
    """Hold ``root`` for this process: a second ``ulma compare`` into the same folder would train the
    same stages at the same time. An OS file lock on ``root/.ulma-compare.lock`` (taken with one
    call, freed by the system when its holder dies), so two processes starting at once cannot both
    hold it; the file, holding the holder's process id, stays and marks the folder as compare's."""
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_FILE
    while True:
        handle = open(lock, "a+")  # noqa: SIM115 - held open until the end of the compare
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise GridError(
                f"{root}: another ulma compare (process {holder}) is writing here; wait for it to end or pass another "
                "--output"
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the file was replaced while we waited: lock the one now at the path
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        handle.close()


def compare(
    grid: GridSpec,
    root: Path,
    *,
    only: str | None = None,
    launcher: str | None = None,
    command: str = "ulma compare",
    jobs: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the grid (or the ``only`` subset) into ``root``, ``jobs`` runs at a time (default: the grid's
    ``jobs``); write and return the results. ``root`` must be new, empty or an earlier compare's
    output unless ``overwrite`` (:func:`check_output`)."""
    jobs = grid.jobs if jobs is None else jobs
    if jobs < 1:
        raise GridError(f"--jobs must be at least 1, got {jobs}")
    plan = plan_grid(grid)
    # seed by seed: a grid stopped part-way has whole seeds of every row, not every seed of some rows
    chosen = sorted(select(plan, only), key=lambda instance: grid.seeds.index(instance.seed))
    check_output(root, overwrite)
    with output_lock(root):
        return _compare(grid, plan, chosen, root, launcher, command, jobs)


def _compare(
    grid: GridSpec, plan: Plan, chosen: list[Instance], root: Path, launcher: str | None, command: str, jobs: int = 1
) -> dict[str, Any]:
    """The body of :func:`compare`, run while holding the output folder."""
    runner = Runner(grid, plan, root, launcher or grid.launcher)
    try:
        return _run_all(runner, grid, plan, chosen, root, launcher, command, jobs)
    finally:
        if runner.restore_output is not None:  # this process goes on (tests, notebooks): as it was
            runner.restore_output()


def _run_all(
    runner: Runner,
    grid: GridSpec,
    plan: Plan,
    chosen: list[Instance],
    root: Path,
    launcher: str | None,
    command: str,
    jobs: int,
) -> dict[str, Any]:
    """Train and evaluate ``chosen`` with ``runner`` (sequentially or ``jobs`` at a time), writing the results."""
    total = len(chosen)
    todo = []
    for number, instance in enumerate(chosen):
        if runner.finished(run_folder(root, instance.id) / RESULT_FILE):
            print(f"[ulma compare] {number + 1}/{total} {instance.id}: finished earlier, skipped", flush=True)
        else:
            todo.append(instance)
    done = total - len(todo)

    def record(instance_id: str, result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        status = "done" if result["status"] == "ok" else "FAILED: " + result["error"].splitlines()[0]
        left = [i.id for i in todo if not runner.finished(run_folder(root, i.id) / RESULT_FILE) and i.id != instance_id]
        eta = f"; {eta_line(grid, plan, root, left, jobs)}" if left else ""
        print(
            f"[ulma compare] {instance_id} {status} ({result['seconds']:.1f} s); {done}/{total} runs done, "
            f"{total - done} left{eta}",
            flush=True,
        )
        write_results(collect(grid, plan, root), root, command)  # after every run, so a kill leaves up-to-date files

    if jobs > 1 and len(todo) > 1:
        print(f"[ulma compare] {len(todo)} runs on {jobs} worker processes", flush=True)
        run_parallel(Runner, (grid, plan, root, launcher or grid.launcher), [i.id for i in todo], jobs, record)
    else:
        for instance in todo:
            print(f"[ulma compare] {done}/{total} runs done, {total - done} left; running {instance.id}", flush=True)
            record(instance.id, runner.run(instance))
    results = collect(grid, plan, root)
    write_results(results, root, command)
    results["plots"] = [str(p) for p in write_plots(results, root)]
    print(f"[ulma compare] {total}/{total} runs done; results in {root / 'results.md'}", flush=True)
    return results


def tune(
    grid: GridSpec,
    root: Path,
    *,
    only: str | None = None,
    launcher: str | None = None,
    command: str = "ulma compare --tune",
    jobs: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tune every stage of the grid in its chain, by depth (:mod:`~ulma_lightning.compare.tune`), into
    ``root``; write the picks (``tuned.yaml``) and return the last results with ``tuned`` and ``rounds``."""
    if grid.tune is None:
        raise GridError(
            f"{grid.path}: --tune needs a `tune:` section (prompts: validation prompts; grid: option -> values)"
        )
    last: dict[str, Any] = {}

    def run(candidates: GridSpec) -> dict[str, Any]:
        nonlocal last
        last = compare(candidates, root, only=only, launcher=launcher, command=command, jobs=jobs, overwrite=overwrite)
        return last

    tuned, rounds = tune_chains(grid, run)
    last["tuned"], last["rounds"] = tuned, rounds
    write_tuned(tuned, root / "tuned.yaml", command, rounds)
    print(
        f"[ulma compare] chosen values (mean validation score), to commit into {grid.path}:\n"
        + (root / "tuned.yaml").read_text(),
        flush=True,
    )
    return last


def compare_main(argv: list[str]) -> dict[str, Any]:
    """``ulma compare`` with command-line arguments ``argv``."""
    parser = argparse.ArgumentParser(
        prog="ulma compare",
        description=(
            "Train and evaluate a grid of runs (methods x data variants x seeds, stages chained) and write "
            "results.md, results.json and PNG plots. Started again, it skips finished runs."
        ),
    )
    parser.add_argument("--config", required=True, help="the grid YAML, e.g. experiments/paper.yaml")
    parser.add_argument("--quick", action="store_true", help="the grid's `quick:` subset (fewer seeds, runs and steps)")
    parser.add_argument(
        "--output",
        default=None,
        help="output folder (default: the grid's `output`, else runs/compare/<grid name>[-quick])",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "write into an --output folder that holds files ulma compare did not write (files of the same names "
            "are replaced)"
        ),
    )
    parser.add_argument(
        "--only", default=None, help="run only this run name (all its variants and seeds), or one RUN/VARIANT/seedS"
    )
    parser.add_argument(
        "--heldout",
        action="store_true",
        help="the grid's `heldout:` set (other seeds and data draw), for the claims' second check",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="list the stages (and which runs share them), the runs and an estimated time, without training",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help=(
            "choose each method's hyper-parameters by the grid's `tune:` rule (validation score); writes "
            "OUTPUT/tune/tuned.yaml"
        ),
    )
    parser.add_argument(
        "--launcher",
        choices=("inprocess", "subprocess"),
        default=None,
        help="run each `ulma fit` in this process (default) or in a child process",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help=(
            "train N runs at a time in worker processes (stages they share are trained once; default: the grid's "
            "`jobs`, else 1); each uses cpu_count/N threads unless OMP_NUM_THREADS is set"
        ),
    )
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.config, quick=args.quick, heldout=args.heldout)
        suffix = ("-heldout" if args.heldout else "") + ("-quick" if args.quick else "")
        root = Path(
            args.output
            or (grid.output + ("-heldout" if args.heldout else "") if grid.output else None)
            or Path("runs") / "compare" / (grid.name + suffix)
        )
        command = "ulma compare " + shlex.join(argv)
        if args.plan:
            text = tune_overview(grid) if args.tune else describe(grid, plan_grid(grid), root, args.jobs or grid.jobs)
            print(text, flush=True)
            return {"plan": text}
        if args.tune:
            return tune(
                grid,
                root / "tune",
                only=args.only,
                launcher=args.launcher,
                command=command,
                jobs=args.jobs,
                overwrite=args.overwrite,
            )
        return compare(
            grid,
            root,
            only=args.only,
            launcher=args.launcher,
            command=command,
            jobs=args.jobs,
            overwrite=args.overwrite,
        )
    except GridError as exc:
        print(f"ulma compare: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def compare_command(argv: list[str]) -> dict[str, Any]:
    """The ``ulma compare`` command: :func:`compare_main`, ending with exit status 1 when a run failed
    (its error is in ``results.md``; the other runs were still trained and evaluated)."""
    results = compare_main(argv)
    failed = [str(r.get("id")) for r in results.get("runs", []) if r.get("status") == "failed"]
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        print(
            f"ulma compare: {len(failed)} of {len(results['runs'])} runs failed ({shown}); their errors are in "
            "results.md",
            file=sys.stderr,
        )
        raise SystemExit(1)
    return results
