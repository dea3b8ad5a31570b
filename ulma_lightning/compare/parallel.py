"""``ulma compare --jobs N``: run a grid's instances in N worker processes.

Each worker runs whole instances (their stages in order, then the evaluation), exactly as the
sequential runner does. Stages shared by several instances (one SFT model under the SFT row and the
SFT-then-DPO row) and untrained models are guarded by a lock file per stage
(:func:`stage_lock`): the first worker trains it, the others wait and reuse it. Each worker uses
``cpu_count // N`` torch threads unless ``OMP_NUM_THREADS`` is set, and ends when its parent does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

_RUNNER: Any = None  # the worker's Runner, built once per process


@contextlib.contextmanager
def stage_lock(root: Path, key: str) -> Iterator[None]:
    """Hold ``root/stages/.locks/<key>`` (an OS file lock, freed if the holder dies) while inside."""
    path = root / "stages" / ".locks" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """End this worker as soon as the parent ``ulma compare`` is gone (killed, even by SIGKILL): a
    thread watches the parent process id. No orphan goes on training; the stage it was in resumes
    from its last (atomically written) checkpoint when the compare is started again. A signal is not
    enough: a SIGTERM that reaches a worker between fits can be swallowed by a trainer's handler."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="ulma-compare-parent-watch", daemon=True).start()


def _init_worker(runner_class: type, runner_args: tuple[Any, ...], jobs: int, parent: int) -> None:
    global _RUNNER
    _exit_with_parent(parent)
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    _RUNNER = runner_class(*runner_args)


def _run(instance_id: str) -> dict[str, Any]:
    instance = next(i for i in _RUNNER.plan.instances if i.id == instance_id)
    return _RUNNER.run(instance)


def run_parallel(
    runner_class: type,
    runner_args: tuple[Any, ...],
    instance_ids: list[str],
    jobs: int,
    on_done: Callable[[str, dict[str, Any]], None],
) -> None:
    """Run ``instance_ids`` on ``jobs`` worker processes, each with its own ``runner_class(*runner_args)``
    (the :class:`~ulma_lightning.compare.runner.Runner`); ``on_done(id, result)`` as each ends."""
    context = get_context("spawn")  # a fresh interpreter: no torch threads or CUDA state inherited
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(runner_class, runner_args, jobs, os.getpid()),
    ) as pool:
        futures: dict[Future[dict[str, Any]], str] = {pool.submit(_run, i): i for i in instance_ids}
        try:
            for future in as_completed(futures):
                on_done(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
