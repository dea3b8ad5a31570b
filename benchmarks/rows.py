"""Benchmark rows: each in its own process, timed in groups step by step in turn, with its own memory peak.

A row is one (library, method, reference, precision) on bench-A batches, or a scaling point.
Every measurement runs in a fresh child process that has imported torch, transformers, TRL and the
library (``benchmarks.preload``) before it builds anything, so every child starts from the same
memory baseline.

* Speed and memory (:func:`run_group`): the rows that are compared with each other (e.g. ULMA,
  point-wise DPO, KTO and TRL's KTOTrainer) each run in their own process (:func:`row_worker`) and
  are trained step by step in turn (step 1 of each, then step 2 of each, ... the order rotating
  every step): on a shared machine a slow spell then hits every row alike, which is what makes the
  ratios trustworthy. Each process resets its peak RSS before it builds its row (model, reference,
  optimizer, trainer) and reads it after the last step; each has its own OpenMP settings.
* Scaling points (:func:`run_row`): one process each, timing and memory together.
"""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks import allocator, memory
from benchmarks import flops as F
from benchmarks.quiet import QUIET_CORES, Gate, Snapshot
from benchmarks.workload import BATCH_SIZE, MAX_LENGTH, MEASURED_STEPS, THREADS, WARMUP_STEPS, Sample

RETRIES = 1  # a timed step disturbed by a neighbour that started during it is run again
GATE = Gate()  # waits for a quiet machine before each timed step (see benchmarks/quiet.py)


@dataclass
class Row:
    """What to run.

    Attributes:
        impl: ``ours`` or ``trl``.
        method: ``ulma``, ``pointwise_dpo``, ``dpo``, ``sft`` or ``kto``.
        reference: ``copy``, ``precomputed`` or ``none``.
        precision: ``fp32`` or ``bf16`` (autocast).
        warmup, measured: step counts.
        max_length: sequence length cap (bench-A: 512).
        vocab: model vocabulary (bench-A: 32,000).
        fixed_length: scaling rows: every sequence exactly ``max_length`` tokens (28% response).
        options: extra keyword arguments of the library row (e.g. ``chunk_size``, ``compile``).
        alone: timed in a group of its own, no other row interleaved (the MFU measurement).
        allocator: ``default`` (glibc) or ``jemalloc``, the process's allocator (``benchmarks/allocator.py``).
    """

    impl: str
    method: str
    reference: str = "copy"
    precision: str = "fp32"
    warmup: int = WARMUP_STEPS
    measured: int = MEASURED_STEPS
    max_length: int = MAX_LENGTH
    vocab: int = 32000
    fixed_length: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    alone: bool = False
    allocator: str = "default"

    @property
    def name(self) -> str:
        lib = "ulma-lightning" if self.impl == "ours" else "TRL"
        ref = {"copy": "", "precomputed": " +precomputed ref", "none": ""}[self.reference]
        alloc = f" {self.allocator}" if self.allocator != "default" else ""
        compiled = " compiled" if self.options.get("compile") else ""
        return f"{lib} {self.method}{ref} {self.precision}{compiled}{alloc}{' alone' if self.alone else ''}"

    @property
    def steps(self) -> int:
        return self.warmup + self.measured


def _kind(method: str) -> str:
    return {"dpo": "pairwise", "sft": "sft"}.get(method, "pointwise")


def _fixed_length_samples(samples: list[Sample], length: int, count: int) -> list[Sample]:
    """``count`` sequences of exactly ``length`` real HH tokens: 72% prompt, 28% response, +/- labels."""
    stream = [t for s in samples for t in s.prompt_ids + s.response_ids]
    while len(stream) < length * count:
        stream = stream + stream
    response = max(1, round(0.28 * length))
    out = []
    for i in range(count):
        ids = stream[i * length : (i + 1) * length]
        out.append(Sample(ids[: length - response], ids[length - response :], score=float(i % 2 == 0)))
    return out


def _seqs(row: Row, samples: list[Any]) -> tuple[list[list[F.Seq]], list[list[F.Seq]] | None]:
    """Per-step training rows (and KTO's KL rows) for the FLOP count."""
    per_step = BATCH_SIZE // 2 if row.method == "dpo" else BATCH_SIZE
    steps, kl_steps = [], []
    for start in range(0, len(samples), per_step):
        chunk = samples[start : start + per_step]
        if row.method == "dpo":
            seqs = [F.Seq(s.length, len(s.response_ids), s.score >= 1.0) for pair in chunk for s in pair]
        else:
            seqs = [F.Seq(s.length, len(s.response_ids), s.score >= 1.0) for s in chunk]
        steps.append(seqs)
        if row.method == "kto":
            rotated = [chunk[-1]] + chunk[:-1]
            kl = []
            for s, other in zip(chunk, rotated):
                length = min(len(s.prompt_ids) + len(other.response_ids), row.max_length)
                kl.append(F.Seq(length, length - len(s.prompt_ids), True))
            kl_steps.append(kl)
    return steps, (kl_steps if row.method == "kto" else None)


def _padded(batch: dict[str, Any]) -> int:
    """Token slots of the training sequences including padding (KTO's KL rows excluded)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and not k.startswith("KL_"))


def _attempt(result: dict[str, Any], fn: Any) -> Any:
    """``fn()``, recording a failure in ``result`` (reported in the table, not fatal for other rows)."""
    try:
        return fn()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        return None


def _guard(row: Row, fn: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"row": asdict(row), "name": row.name}
    result.update(_attempt(result, fn) or {})
    return result


class Prepared:
    """A row's runner (library module or TRL trainer) with its batches, ready to step."""

    def __init__(self, row: Row, samples: list[Any] | None = None) -> None:
        from transformers import AutoTokenizer

        from benchmarks import workload

        self.row = row
        data = workload.build_samples(max_length=MAX_LENGTH if row.fixed_length else row.max_length)
        if samples is None:
            samples = data[_kind(row.method)]
            if row.fixed_length:
                samples = _fixed_length_samples(data["pointwise"], row.max_length, BATCH_SIZE * row.steps)
            per_step = BATCH_SIZE // 2 if row.method == "dpo" else BATCH_SIZE
            samples = samples[: per_step * row.steps]
        self.samples = samples
        self.config = workload.model_config(vocab_size=row.vocab)
        tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
        self.tokenizer_dir = data["tokenizer"]
        gc.collect()
        self.base_mb = memory.rss_mb()
        self.resettable = memory.reset_peak()
        bf16 = row.precision == "bf16"
        if row.impl == "ours":
            from benchmarks.ours import OurRow

            self.runner: Any = OurRow(
                row.method,
                row.reference,
                bf16,
                data["tokenizer"],
                model_overrides={"vocab_size": row.vocab},
                **row.options,
            )
            model = self.runner.model
        else:
            from benchmarks.trl_rows import TRLRow

            model = workload.build_model(vocab_size=row.vocab)
            self.runner = TRLRow(row.method, row.reference, bf16, model, tokenizer)
        with torch.no_grad():
            self.checksum = float(sum(p.double().sum() for p in model.parameters()))
        start = time.perf_counter()
        self.batches = self.runner.collate(samples)
        self.prepare_s = time.perf_counter() - start
        self.step_seqs, self.kl_seqs = _seqs(row, samples)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.flops: list[float] = []
        self.foreign: list[float] = []
        self.attempts: list[int] = []
        self.waited: list[float] = []

    def step(self, i: int, quiet: bool = False) -> None:
        """Train on batch ``i``, timed. With ``quiet``, wait for a quiet machine first and retry
        (up to ``RETRIES`` times) a step during which other processes used the CPU."""
        batch, row = self.batches[i], self.row
        waited = 0.0
        for attempt in range(RETRIES + 1 if quiet else 1):  # noqa: B007  (read after the loop)
            found_quiet = False
            if quiet:
                pause, found_quiet = GATE.wait()
                waited += pause
            snapshot = Snapshot.take()
            start_cpu = time.process_time()
            loss = self.runner.step(batch, i) if row.impl == "ours" else self.runner.step(batch)
            wall, cpu = time.perf_counter() - snapshot.wall, time.process_time() - start_cpu
            foreign = snapshot.foreign_cores()
            if foreign < QUIET_CORES or not found_quiet:
                break
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.foreign.append(foreign)
        self.attempts.append(attempt + 1)
        self.waited.append(waited)
        self.losses.append(loss)
        self.tokens.append(sum(s.length for s in self.step_seqs[i]))
        if self.runner.useful_tokens(batch) != self.tokens[-1]:
            raise AssertionError(
                f"step {i}: the batch holds {self.runner.useful_tokens(batch)} non-pad tokens, "
                f"the samples {self.tokens[-1]}"
            )
        self.flops.append(
            F.needed_flops(
                self.config, row.method, row.reference, self.step_seqs[i], self.kl_seqs[i] if self.kl_seqs else None
            )
        )

    def timing(self) -> dict[str, Any]:
        row = self.row
        if not all(math.isfinite(x) for x in self.losses):
            raise FloatingPointError(f"non-finite loss: {self.losses}")
        measured = slice(row.warmup, None)
        wall, tokens, flops = sum(self.wall[measured]), sum(self.tokens[measured]), sum(self.flops[measured])
        return {
            "tokens_per_s": tokens / wall,
            "s_per_step": wall / row.measured,
            "cpu_tokens_per_s": tokens / sum(self.cpu[measured]),
            "achieved_flops": flops / wall,
            "needed_flops_per_step": flops / row.measured,
            "useful_tokens_per_step": tokens / row.measured,
            "padded_tokens_per_step": sum(_padded(b) for b in self.batches[measured]) / row.measured,
            "prepare_s": self.prepare_s,
            "step_wall_s": self.wall,
            "step_cpu_s": self.cpu,
            "step_tokens": self.tokens,
            "step_foreign_cores": self.foreign,
            "step_attempts": self.attempts,
            "waited_s": sum(self.waited),
            "disturbed_steps": sum(f >= QUIET_CORES for f in self.foreign[measured]),
            **self._quiet_timing(measured),
            "losses": self.losses,
            "init_checksum": self.checksum,
            "loadavg": os.getloadavg(),
        }

    def _quiet_timing(self, measured: slice) -> dict[str, Any]:
        """tokens/s over the measured steps that ran on a quiet machine (None if under 3)."""
        steps = [j for j in range(len(self.wall))[measured] if self.foreign[j] < QUIET_CORES]
        if len(steps) < 3:
            return {"quiet_tokens_per_s": None, "quiet_step_indices": steps}
        return {
            "quiet_tokens_per_s": sum(self.tokens[j] for j in steps) / sum(self.wall[j] for j in steps),
            "quiet_step_indices": steps,
        }

    def memory(self) -> dict[str, Any]:
        peak = memory.peak_mb()
        return {
            "peak_rss_mb": peak,
            "base_rss_mb": self.base_mb,
            "train_mb": peak - self.base_mb,
            "peak_resettable": self.resettable,
        }


def row_worker(conn: Any, row: Row) -> None:
    """One row in its own process, stepping when its group's coordinator says (see :func:`run_group`).

    Sends ``True``/``False`` (built / failed), then answers each step index with ``True``/``False``
    (stepped / failed), and after ``None`` sends the row's result: timing and the process's
    memory peak.
    """
    import benchmarks.preload  # noqa: F401 - the same imports, so the same baseline, in every worker

    torch.set_num_threads(THREADS)
    result: dict[str, Any] = {
        "row": asdict(row),
        "name": row.name,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    result["allocator_loaded"] = allocator.loaded()
    if result["allocator_loaded"] != row.allocator:
        result["error"] = f"asked for the {row.allocator} allocator, the process runs with {result['allocator_loaded']}"
    prepared = None if "error" in result else _attempt(result, lambda: Prepared(row))
    conn.send("error" not in result)
    while (step := conn.recv()) is not None:
        if prepared is not None and "error" not in result:
            _attempt(result, lambda: prepared.step(step, quiet=True))
        conn.send("error" not in result)
    if prepared is not None and "error" not in result:
        result.update(_attempt(result, lambda: {**prepared.timing(), **prepared.memory()}) or {})
    conn.send(result)


def _receive(conn: Any, row: Row, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"{row.name}: no answer within {timeout:.0f} s")
    return conn.recv()


def _failed(row: Row, where: str, exc: BaseException) -> dict[str, Any]:
    return {"row": asdict(row), "name": row.name, "error": f"{where}: {type(exc).__name__}: {exc}"}


def run_group(rows: list[Row], start: Any, timeout: float = 1200) -> list[dict[str, Any]]:
    """Time ``rows`` step by step in turn (the order rotating every step), each in its own process.

    ``start(row)`` starts :func:`row_worker` for a row and returns ``(process, connection)``. The
    rows are built at the same time, then stepped one at a time, so a slow spell of a shared machine
    hits them alike, while each has its own memory peak and its own OpenMP settings.
    """
    workers = [start(row) for row in rows]
    results: list[dict[str, Any] | None] = [None] * len(rows)
    live = []
    for i, (row, (_process, conn)) in enumerate(zip(rows, workers)):
        try:
            if _receive(conn, row, timeout):
                live.append(i)
        except (EOFError, OSError, TimeoutError) as exc:
            results[i] = _failed(row, "worker", exc)
    for step in range(max((rows[i].steps for i in live), default=0)):
        shift = step % max(1, len(live))
        for i in live[shift:] + live[:shift]:
            if step < rows[i].steps and results[i] is None:
                conn = workers[i][1]
                try:
                    conn.send(step)
                    _receive(conn, rows[i], timeout)
                except (EOFError, OSError, TimeoutError) as exc:
                    results[i] = _failed(rows[i], f"worker died at step {step}", exc)
    for i, (process, conn) in enumerate(workers):
        if results[i] is None:
            try:
                conn.send(None)
                results[i] = _receive(conn, rows[i], timeout)
            except (EOFError, OSError, TimeoutError) as exc:
                results[i] = _failed(rows[i], "worker", exc)
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    return [r for r in results if r is not None]


def run_row(row: Row) -> dict[str, Any]:
    """Timing and memory of one row in this process (the scaling points)."""
    torch.set_num_threads(THREADS)

    def measure() -> dict[str, Any]:
        prepared = Prepared(row)
        for i in range(row.steps):
            prepared.step(i, quiet=True)
        return {**prepared.timing(), **prepared.memory()}

    return _guard(row, measure)
