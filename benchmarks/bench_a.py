"""bench-A: the library against TRL on the same data, model and batches; plus the scaling run.

    PYTHONPATH=. python -m benchmarks.bench_a            # everything; rewrites docs/benchmarks.{md,json}
    PYTHONPATH=. python -m benchmarks.bench_a --quick    # 1+1 steps, a few rows, to /tmp (smoke run)

Every compared row runs once per allocator setting of its library (``--ours-allocator``,
``--trl-allocator``: ``default``, ``jemalloc`` or ``both``, the default; see ``benchmarks/allocator.py``);
the report's headline ratios set each library at its fastest measured setting.

Each group of compared rows (the library's ULMA, point-wise DPO and KTO with TRL's KTOTrainer, ...)
is timed step by step in turn, each row in its own process (its own memory peak, its own OpenMP
settings), so that slow spells of a shared machine hit all of them (see ``benchmarks/rows.py``).
The matmul peaks are measured before and after the rows; the best is used.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import allocator, workload
from benchmarks.rows import Row

DOCS = workload.REPO / "docs"
SCALING_LENGTHS = (128, 256, 512, 1024)
SCALING_VOCABS = (32000, 128000)
# OpenMP wait policy per library ("default": OpenMP's own, what a user gets; see the OpenMP note in report.py)
DEFAULT_POLICIES = {"ours": "default", "trl": "default"}
# allocator per library: measure glibc's and jemalloc's, the report takes each library's fastest
DEFAULT_ALLOCATORS = {"ours": "both", "trl": "both"}


def main_groups() -> list[list[Row]]:
    """bench-A rows, in groups timed together: each TRL row (first: its memory is measured in the
    group's process) with the library rows compared with it."""
    fp32 = [
        [Row("trl", "kto"), Row("ours", "ulma"), Row("ours", "pointwise_dpo"), Row("ours", "kto")],
        [
            Row("trl", "kto", "precomputed"),
            Row("ours", "ulma", "precomputed"),
            Row("ours", "pointwise_dpo", "precomputed"),
        ],
        [Row("trl", "dpo"), Row("ours", "dpo")],
        [Row("trl", "dpo", "precomputed"), Row("ours", "dpo", "precomputed")],
        [Row("trl", "sft", "none"), Row("ours", "sft", "none")],
    ]
    bf16 = [
        [Row(r.impl, r.method, r.reference, "bf16") for r in group if r.reference != "precomputed"] for group in fp32
    ]
    return fp32 + [g for g in bf16 if g]


def with_allocators(groups: list[list[Row]], settings: dict[str, list[str]]) -> list[list[Row]]:
    """Each row once per allocator setting of its library, in the same group (timed in turn)."""
    return [[replace(r, allocator=a) for r in group for a in settings[r.impl]] for group in groups]


def alone_rows() -> list[Row]:
    """ULMA float32 timed with no other row interleaved, right after the matmul peak: the MFU target's
    numerator measured under the same conditions as its denominator."""
    # and with policy.compile (the blocks through torch.compile): more warm-up steps, which compile
    return [
        Row("ours", "ulma", alone=True),
        Row(
            "ours",
            "ulma",
            alone=True,
            warmup=workload.WARMUP_STEPS + 3,
            measured=workload.MEASURED_STEPS - 3,
            options={"compile": {"dynamic": True}},
        ),
    ]


def scaling_rows(warmup: int = 1, measured: int = 2) -> list[Row]:
    return [
        Row("ours", "ulma", warmup=warmup, measured=measured, max_length=length, vocab=vocab, fixed_length=True)
        for vocab in SCALING_VOCABS
        for length in SCALING_LENGTHS
    ]


# ------------------------------------------------------------------ child processes
def _send(conn: Any, fn: Callable[[Any], Any], arg: Any) -> None:
    conn.send(fn(arg))
    conn.close()


def in_child(ctx: Any, fn: Callable[[Any], Any], arg: Any, timeout: float = 1200) -> Any:
    """``fn(arg)`` in a fresh forked child; its own memory, its own peak."""
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_send, args=(send, fn, arg))
    process.start()
    send.close()
    if not receive.poll(timeout):
        process.kill()
        raise TimeoutError(f"{getattr(arg, 'name', arg)} did not finish within {timeout:.0f} s")
    result = receive.recv()
    process.join()
    return result


def measure_peaks(_: Any = None) -> dict[str, float]:
    import torch

    from benchmarks.flops import matmul_peak
    from benchmarks.quiet import QUIET_CORES, Snapshot, wait_quiet

    torch.set_num_threads(workload.THREADS)
    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(4):  # best of quiet-gated tries: the machine's peak, not the neighbours' load
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            wait_quiet(30.0)
            snapshot = Snapshot.take()
            value = matmul_peak(dtype)
            if snapshot.foreign_cores() < QUIET_CORES or best[name] == 0.0:
                best[name] = max(best[name], value)
    return best


def machine() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": workload.THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


POLICIES = ("default", "PASSIVE", "ACTIVE")


def _set_policy(policy: str) -> None:
    """``OMP_WAIT_POLICY`` for processes started from now on (``default``: unset, OpenMP's own)."""
    if policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy


def run(
    groups: list[list[Row]],
    scaling: list[Row],
    out: Path,
    alone: list[Row] | None = None,
    log: Callable[[str], None] = print,
    omp_wait_policy: dict[str, str] | None = None,
    allocators: dict[str, str] | None = None,
) -> dict[str, Any]:
    from benchmarks import report
    from benchmarks.rows import row_worker, run_group, run_row

    started = time.perf_counter()

    def note(message: str) -> None:
        log(f"[{(time.perf_counter() - started) / 60:4.1f} min] {message}")

    policies = {**DEFAULT_POLICIES, **(omp_wait_policy or {})}
    choices = {**DEFAULT_ALLOCATORS, **(allocators or {})}
    jemalloc = allocator.find_jemalloc()
    settings, notes = {}, []
    for impl in ("ours", "trl"):
        settings[impl], missing = allocator.resolve(choices[impl], jemalloc)
        if missing and missing not in notes:
            notes.append(missing)
    for message in notes:
        note(f"NOTE: {message}")
    note(
        f"allocators measured: the library's {', '.join(settings['ours'])}; TRL's {', '.join(settings['trl'])}"
        + (f" (jemalloc: {jemalloc})" if jemalloc else "")
    )
    groups = with_allocators(groups, settings)
    # LD_PRELOAD too is read when a process starts: the fork server runs with the default allocator
    # (so do the matmul peaks, the alone row and the scaling run); a jemalloc row is spawned with it.
    outer = allocator.environment("default", jemalloc, os.environ)
    for key in ("LD_PRELOAD", "MALLOC_CONF"):
        if key in outer:
            os.environ[key] = outer[key]
        else:
            os.environ.pop(key, None)
    # OpenMP reads OMP_WAIT_POLICY once, when a process loads it: the fork server (the library's rows,
    # the matmul peaks, the scaling run) is started with the library's policy; a TRL row whose policy
    # differs runs in a freshly spawned process started with its own.
    _set_policy(policies["ours"])
    workload.tokenizer_dir()
    workload.build_samples()
    fork = mp.get_context("forkserver")
    fork.set_forkserver_preload(["benchmarks.preload"])
    spawn = mp.get_context("spawn")

    def start(row: Row) -> tuple[Any, Any]:
        own = policies[row.impl]
        ctx = fork if own == policies["ours"] and row.allocator == "default" else spawn
        conn, child = ctx.Pipe()
        _set_policy(own)
        try:
            with allocator.applied(row.allocator, jemalloc):
                process = ctx.Process(target=row_worker, args=(child, row), daemon=True)
                process.start()
        finally:
            _set_policy(policies["ours"])
        child.close()
        return process, conn

    peaks_before = in_child(fork, measure_peaks, None)
    note(f"matmul peak: fp32 {peaks_before['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks_before['bf16'] / 1e9:.0f} GFLOP/s")
    results = []
    for row in alone or []:
        results.extend(run_group([row], start))
        note(_line(results[-1]))
    for group in groups:
        for result in run_group(group, start):
            results.append(result)
            note(_line(result))
    for row in scaling:
        results.append(in_child(fork, run_row, row))
        note(_line(results[-1]))
    peaks_after = in_child(fork, measure_peaks, None)
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    data = {
        "workload": report.workload_description(),
        "machine": machine(),
        "matmul_peak_flops": peaks,
        "matmul_peak_runs": [peaks_before, peaks_after],
        "rows": [r for r in results if not r["row"]["fixed_length"] and not r["row"]["alone"]],
        "alone": [r for r in results if r["row"]["alone"]],
        "scaling": [r for r in results if r["row"]["fixed_length"]],
        "wall_s": time.perf_counter() - started,
        "command": "PYTHONPATH=. python -m benchmarks.bench_a",
        "omp_wait_policy": policies,
        "allocator": {
            "ours": settings["ours"],
            "trl": settings["trl"],
            "jemalloc": jemalloc,
            "malloc_conf": allocator.MALLOC_CONF,
            "notes": notes,
        },
    }
    report.annotate(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(data, indent=1) + "\n")
    markdown = report.markdown(data)
    (out / "benchmarks.md").write_text(markdown)
    log(markdown)
    return data


def _line(result: dict[str, Any]) -> str:
    row = result["row"]
    where = f" L={row['max_length']} V={row['vocab']}" if row["fixed_length"] else ""
    if "error" in result:
        return f"{result['name']}{where}: FAILED {result['error']}"
    return (
        f"{result['name']}{where}: {result['tokens_per_s']:.0f} tok/s, {result['s_per_step']:.2f} s/step, "
        f"peak {result.get('peak_rss_mb', 0):.0f} MB (+{result.get('train_mb', 0):.0f}), "
        f"load {result['loadavg'][0]:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 warm-up + 1 measured step, a few rows; writes to --out (default /tmp/bench-quick)",
    )
    parser.add_argument("--only", default="", help="run only rows whose name contains this text (e.g. 'ulma', 'fp32')")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling run")
    for impl, label in (("ours", "the library's"), ("trl", "TRL's")):
        parser.add_argument(
            f"--{impl}-omp-wait-policy",
            choices=POLICIES,
            default=DEFAULT_POLICIES[impl],
            help=f"OMP_WAIT_POLICY of {label} rows (default: %(default)s; 'default' leaves OpenMP's own)",
        )
    for impl, label in (("ours", "the library's"), ("trl", "TRL's")):
        parser.add_argument(
            f"--{impl}-allocator",
            choices=allocator.CHOICES,
            default=DEFAULT_ALLOCATORS[impl],
            help=f"allocator of {label} rows: glibc's ('default'), jemalloc through LD_PRELOAD, or 'both' "
            "(each measured; default: %(default)s)",
        )
    parser.add_argument("--out", type=Path, default=None, help="where benchmarks.md/json go (default docs/)")
    args = parser.parse_args(argv)
    try:
        workload.require_data()
    except workload.MissingData as exc:
        print(f"bench-A skipped: {exc}")
        return 0
    groups, scaling, alone = main_groups(), ([] if args.no_scaling else scaling_rows()), alone_rows()
    if args.quick:
        groups = [[replace(r, warmup=1, measured=1) for r in g] for g in groups]
        alone = [replace(r, warmup=1, measured=1) for r in alone]
        scaling = [replace(r, warmup=0, measured=1) for r in scaling]
    if args.only:
        groups = [[r for r in g if args.only in r.name] for g in groups]
        groups = [g for g in groups if g]
        scaling = [r for r in scaling if args.only in r.name]
        alone = [r for r in alone if args.only in r.name]
    out = args.out or (Path("/tmp/bench-quick") if args.quick else DOCS)
    run(
        groups,
        scaling,
        out,
        alone=alone,
        omp_wait_policy={"ours": args.ours_omp_wait_policy, "trl": args.trl_omp_wait_policy},
        allocators={"ours": args.ours_allocator, "trl": args.trl_allocator},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
