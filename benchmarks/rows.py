"""Benchmark rows: timed in groups, step by step in turn; memory measured one row per process.

A row is one (library, method, reference, precision) on bench-A batches, or a scaling point.
Every measurement runs in a fresh child process forked from a server that has already imported
torch, transformers, TRL and the library (``benchmarks.preload``), so every child starts from the
same memory baseline and the import time is not paid per row.

* Speed (:func:`run_group`): the rows that are compared with each other (e.g. ULMA, point-wise DPO,
  KTO and TRL's KTOTrainer) are built in one process and trained step by step in turn (step 1 of
  each, then step 2 of each, ... the order rotating every step). On a shared machine a slow spell
  then hits every row alike, which is what makes the ratios trustworthy.
* Memory (:func:`run_memory`): each row alone in its own process: reset the peak RSS, build the
  model (reference, optimizer, trainer), and train one step on the bench-A batch with the most
  token slots (padding included), the step that sets the peak; read the peak.
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

from benchmarks import flops as F
from benchmarks import memory
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
        options: extra keyword arguments of the library row (e.g. ``length_groups``).
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

    @property
    def name(self) -> str:
        lib = "ulma-lightning" if self.impl == "ours" else "TRL"
        ref = {"copy": "", "precomputed": " +precomputed ref", "none": ""}[self.reference]
        return f"{lib} {self.method}{ref} {self.precision}"

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


def _slots(batch: dict[str, Any]) -> int:
    """Token slots of a batch including padding and KTO's KL rows: what sets its memory peak."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))


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

            self.runner: Any = OurRow(row.method, row.reference, bf16, data["tokenizer"], model_overrides={"vocab_size": row.vocab}, **row.options)
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
        for attempt in range(RETRIES + 1 if quiet else 1):
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
            raise AssertionError(f"step {i}: the batch holds {self.runner.useful_tokens(batch)} non-pad tokens, the samples {self.tokens[-1]}")
        self.flops.append(F.needed_flops(self.config, row.method, row.reference, self.step_seqs[i], self.kl_seqs[i] if self.kl_seqs else None))

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
        return {"quiet_tokens_per_s": sum(self.tokens[j] for j in steps) / sum(self.wall[j] for j in steps), "quiet_step_indices": steps}

    def memory_step(self) -> dict[str, Any]:
        """One untimed step on the largest batch, then the memory peak (nothing else built yet)."""
        largest = max(range(len(self.batches)), key=lambda j: _slots(self.batches[j]))
        self.runner.step(self.batches[largest], largest) if self.row.impl == "ours" else self.runner.step(self.batches[largest])
        return {**self.memory(), "memory_step_slots": _slots(self.batches[largest])}

    def memory(self) -> dict[str, Any]:
        peak = memory.peak_mb()
        return {"peak_rss_mb": peak, "base_rss_mb": self.base_mb, "train_mb": peak - self.base_mb, "peak_resettable": self.resettable}


def run_group(rows: list[Row]) -> list[dict[str, Any]]:
    """Time ``rows`` in one process, step by step in turn (the order rotating every step).

    The group's first row, if it is TRL's, is built first and trained one extra (untimed) step on
    its largest batch, and its memory peak is read then, before anything else is built: the
    expensive TRL rows need no separate memory process.
    """
    torch.set_num_threads(THREADS)
    results = [{"row": asdict(row), "name": row.name} for row in rows]
    prepared: dict[int, Prepared] = {}
    for i, row in enumerate(rows):
        p = _attempt(results[i], lambda row=row: Prepared(row))
        if p is not None:
            prepared[i] = p
        if p is not None and i == 0 and row.impl == "trl":
            results[i].update(_attempt(results[i], p.memory_step) or {})
    live = list(prepared)
    for step in range(max((rows[i].steps for i in live), default=0)):
        shift = step % max(1, len(live))
        for i in live[shift:] + live[:shift]:
            if "error" not in results[i] and step < rows[i].steps:
                _attempt(results[i], lambda i=i: prepared[i].step(step, quiet=True))
    for i in live:
        if "error" not in results[i]:
            results[i].update(_attempt(results[i], prepared[i].timing) or {})
    return results


def largest_step(row: Row, samples: list[Any]) -> list[Any]:
    """The samples of the bench-A step with the most token slots (padding, and KTO's KL rows, included)."""
    per_step = BATCH_SIZE // 2 if row.method == "dpo" else BATCH_SIZE
    steps = [samples[i : i + per_step] for i in range(0, per_step * row.steps, per_step)]

    def slots(chunk: list[Any]) -> int:
        seqs = [s for pair in chunk for s in pair] if row.method == "dpo" else chunk
        total = len(seqs) * max(s.length for s in seqs)
        if row.method == "kto":
            rotated = [chunk[-1]] + chunk[:-1]
            total += len(chunk) * max(min(len(s.prompt_ids) + len(o.response_ids), row.max_length) for s, o in zip(chunk, rotated))
        return total

    return max(steps, key=slots)


def run_memory(row: Row) -> dict[str, Any]:
    """Peak memory of ``row``: build it and train one step on its largest bench-A batch."""
    torch.set_num_threads(THREADS)

    def measure() -> dict[str, Any]:
        from benchmarks import workload

        data = workload.build_samples(max_length=row.max_length)
        prepared = Prepared(Row(row.impl, row.method, row.reference, row.precision, warmup=0, measured=1, options=row.options), largest_step(row, data[_kind(row.method)]))
        prepared.step(0)
        return {**prepared.memory(), "memory_step_slots": _padded(prepared.batches[0])}

    return _guard(row, measure)


def run_row(row: Row) -> dict[str, Any]:
    """Timing and memory of one row in this process (the scaling points)."""
    torch.set_num_threads(THREADS)

    def measure() -> dict[str, Any]:
        prepared = Prepared(row)
        for i in range(row.steps):
            prepared.step(i, quiet=True)
        return {**prepared.timing(), **prepared.memory()}

    return _guard(row, measure)
