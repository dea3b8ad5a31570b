"""bench-B: the largest model, a Qwen2.5-0.5B-shaped Qwen2 built from its config, ULMA against TRL's KTOTrainer.

    PYTHONPATH=. python -m benchmarks.bench_b                      # both rows; writes docs/benchmarks-b.{md,json}
    PYTHONPATH=. python -m benchmarks.bench_b --find-max-length    # also: the longest max_length ULMA trains at batch 8
                                                                   # (--resume goes on after a kill)
    PYTHONPATH=. python -m benchmarks.bench_b --layers 2 --max-length 64 --out /tmp/bench-b   # a tiny smoke run

Model: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4,864, vocabulary 151,936, tied
embeddings (Qwen2.5-0.5B's shape, random init, seed 0), float32; the reference a frozen copy.
Batches: 8 sequences per step, each exactly ``max_length`` tokens (default 1,024; 72% prompt, 28%
response, every other one a positive), token ids drawn with seed 0 from the vocabulary above the
demo tokenizer's special tokens (the content does not change the work). Each row (the library's
``ULMAModule`` step: ``training_step``, backward, AdamW; TRL's ``KTOTrainer.training_step`` with its
KL sequences, then its optimizer) runs in a fresh child process under a resident-memory cap (default
22 GiB): running out of memory is recorded as a result. Peak memory: the child's peak RSS, whole
process. Gradient checkpointing on by default (``--no-gradient-checkpointing``). Every row and
probe is saved to the JSON as it ends; ``--resume`` reuses those measured with the same settings, so a
run of hours that is killed goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import allocator, capped
from benchmarks.workload import QWEN25_05B, ULMAStep

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TOKENIZER = "builtin:demo"
BATCH = 8


@dataclass
class BRow:
    """One bench-B measurement: ``impl`` (``ours``: ULMA, ``trl``: KTOTrainer) at ``max_length``."""

    impl: str
    max_length: int = 1024
    layers: int = 24
    gradient_checkpointing: bool = True
    warmup: int = 1
    measured: int = 2
    allocator: str = "default"
    threads: int = 2
    warmup_length: int | None = None  # the warm-up steps' tokens per sequence (None: max_length)

    @property
    def name(self) -> str:
        lib = "ulma-lightning ULMA" if self.impl == "ours" else "TRL KTOTrainer"
        return (
            f"{lib} L={self.max_length}{' +checkpointing' if self.gradient_checkpointing else ''}"
            f"{' ' + self.allocator if self.allocator != 'default' else ''}"
        )


def model_config(row: BRow) -> dict[str, Any]:
    return {
        **QWEN25_05B,
        "num_hidden_layers": row.layers,
        "max_position_embeddings": max(QWEN25_05B["max_position_embeddings"], row.max_length),
    }


def samples(row: BRow, first_id: int) -> list[Any]:
    """``BATCH * steps`` sequences of exactly ``max_length`` ids in ``[first_id, vocab)``, seed 0."""
    from benchmarks.workload import Sample

    rng = random.Random(0)
    out = []
    for i in range(BATCH * (row.warmup + row.measured)):
        length = (row.warmup_length or row.max_length) if i < BATCH * row.warmup else row.max_length
        response = max(1, round(0.28 * length))
        ids = [rng.randrange(first_id, QWEN25_05B["vocab_size"]) for _ in range(length)]
        out.append(Sample(ids[:-response], ids[-response:], score=float(i % 2 == 0)))
    return out


class OursB(ULMAStep):
    """The library's ULMA step on the bench-B model (as ``benchmarks/ours.py`` does for bench-A)."""

    def __init__(self, row: BRow) -> None:
        from ulma_lightning import PolicyConfig

        super().__init__(
            PolicyConfig(
                model_config=model_config(row),
                tokenizer=TOKENIZER,
                reference="copy",
                gradient_checkpointing=row.gradient_checkpointing,
            ),
            BATCH,
        )


class TRLB:
    """TRL's KTOTrainer step on the bench-B model (``benchmarks/trl_rows.py``)."""

    def __init__(self, row: BRow, tokenizer: Any) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from benchmarks.trl_rows import TRLRow

        options = model_config(row)
        kind = options.pop("model_type")
        options.update(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **options), dtype=torch.float32)
        self.row = TRLRow(
            "kto",
            "copy",
            False,
            model,
            tokenizer,
            max_length=row.max_length,
            gradient_checkpointing=row.gradient_checkpointing,
        )

    def collate(self, items: list[Any]) -> list[dict[str, Any]]:
        return self.row.collate(items)

    def step(self, batch: dict[str, Any], index: int) -> float:
        return self.row.step(batch)


def measure(row: BRow) -> dict[str, Any]:
    """Build the row, run its steps, time the measured ones (in the child process)."""
    import math

    import torch

    from benchmarks import memory
    from ulma_lightning.tokenizers import load_tokenizer

    torch.set_num_threads(row.threads)
    tokenizer = load_tokenizer(TOKENIZER)
    started = time.perf_counter()
    runner: Any = OursB(row) if row.impl == "ours" else TRLB(row, tokenizer)
    batches = runner.collate(samples(row, len(tokenizer)))
    build_s = time.perf_counter() - started
    walls, losses, peaks = [], [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        losses.append(runner.step(batch, i))
        walls.append(time.perf_counter() - start)
        peaks.append(memory.peak_mb() / 1024)
        print(
            f"  {row.name}: step {i + 1}/{len(batches)} {walls[-1]:.1f} s, RSS peak so far {peaks[-1]:.2f} GiB",
            flush=True,
        )
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    timed = walls[row.warmup :] or walls[-1:]
    tokens = BATCH * row.max_length
    return {
        "s_per_step": sum(timed) / len(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "step_wall_s": walls,
        "peak_rss_gib_after_step": peaks,
        "losses": losses,
        "build_s": build_s,
        "process_peak_rss_gib": memory.peak_mb() / 1024,
        "allocator_loaded": allocator.loaded(),
    }


def run_row(row: BRow, cap_gib: float, timeout_s: float, jemalloc: str | None) -> dict[str, Any]:
    """One row in a fresh process under the memory cap; its result (or why it has none)."""
    with allocator.applied(row.allocator, jemalloc):
        result = capped.run_capped(measure, row, int(cap_gib * capped.GIB), timeout_s=timeout_s)
    if "process_peak_rss_gib" in result:
        result["peak_rss_gib"] = max(result["process_peak_rss_gib"], result.get("polled_peak_rss_gib", 0.0))
    return {"row": asdict(row), "name": row.name, "measured_on": time.strftime("%Y-%m-%d %H:%M"), **result}


def on_record(path: Path) -> list[dict[str, Any]]:
    """The results in an earlier run's ``benchmarks-b.json`` that ``--resume`` may reuse: rows and probes
    that finished or ran out of memory (a failure or a timeout is measured again)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not a bench-B result ({exc}); move it away or run without --resume") from exc
    found = list(data.get("rows") or []) + list((data.get("max_length_search") or {}).get("probes") or [])
    return [r for r in found if "error" not in r or r.get("out_of_memory")]


def same_row(result: dict[str, Any], row: BRow) -> bool:
    try:
        return BRow(**result["row"]) == row
    except (KeyError, TypeError):
        return False


PROBE_WARMUP_LENGTH = 16


def probe_row(base: BRow, length: int) -> BRow:
    """A search probe: one warm-up step on 16-token sequences, which allocates the optimizer's state as
    training does, then one measured step at ``length``: the memory of a step in steady training, at
    the cost of one long step."""
    return replace(base, impl="ours", max_length=length, warmup=1, warmup_length=PROBE_WARMUP_LENGTH, measured=1)


def next_length(
    fits: list[tuple[int, float]], ok: int, bad: int | None, cap_gib: float, limit: int, resolution: int
) -> int | None:
    """The next length to try, or None once the answer is known to ``resolution``.

    With two fitting probes of different peaks, the peak is extrapolated linearly in the length to the
    cap (activations grow linearly in it with checkpointing and a fused attention), clamped inside the
    open bracket; otherwise it doubles. Where the extrapolation lands on the failing side, it bisects.
    """
    if ok == 0:
        half = (bad or 0) // 2 // resolution * resolution
        return half if half >= resolution else None
    low, high = ok + resolution, (bad - resolution if bad is not None else limit)
    if high < low:
        return None
    (l0, p0), (l1, p1) = sorted(fits)[-2:] if len(fits) >= 2 else ((0, 0.0), (ok, 0.0))
    if p1 > p0 and l1 > l0:
        guess = int(l1 + (cap_gib - p1) * (l1 - l0) / (p1 - p0)) // resolution * resolution
    else:
        guess = 2 * ok
    if bad is not None and guess >= high:
        guess = (ok + bad) // 2 // resolution * resolution
    return min(max(guess, low), high)


def find_max_length(
    base: BRow,
    run: Callable[[BRow], dict[str, Any]],
    cap_gib: float,
    limit: int,
    resolution: int,
    first: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The longest ``max_length`` (a multiple of ``resolution``, up to ``limit``) at which the library's
    ULMA trains at batch 8, each verdict a measured probe (:func:`probe_row`); the lengths tried are
    chosen by :func:`next_length`. ``run(row)`` measures a probe; ``first``: the result of a row already
    run at ``base`` (the search starts from it instead of probing that length again)."""
    probes: list[dict[str, Any]] = []
    fits: list[tuple[int, float]] = []
    ok, bad, stopped = 0, None, None

    def verdict(length: int, result: dict[str, Any]) -> None:
        nonlocal ok, bad, stopped
        if "error" not in result:
            fits.append((length, result["peak_rss_gib"]))
            ok = max(ok, length)
        elif result.get("out_of_memory"):
            bad = length if bad is None else min(bad, length)
        else:
            stopped = result["error"]

    length: int | None = max(resolution, base.max_length // resolution * resolution)
    started_from = None
    if first is not None and length == base.max_length:
        started_from = first["name"]
        verdict(length, first)
        length = next_length(fits, ok, bad, cap_gib, limit, resolution) if stopped is None else None
    while length is not None and length <= limit:
        result = run(probe_row(base, length))
        probes.append(result)
        verdict(length, result)
        if stopped is not None:
            break
        length = next_length(fits, ok, bad, cap_gib, limit, resolution)
    return {
        "max_length": ok or None,
        "first_failing": bad,
        "limit": limit,
        "resolution": resolution,
        "stopped": stopped,
        "started_from": started_from,
        "probes": probes,
    }


def line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['name']}: {'OUT OF MEMORY' if result.get('out_of_memory') else 'FAILED'} {result['error']}"
    return (
        f"{result['name']}: {result['s_per_step']:.2f} s/step, {result['tokens_per_s']:.0f} tokens/s, "
        f"peak RSS {result['peak_rss_gib']:.2f} GiB"
    )


# ------------------------------------------------------------------ report
def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    row0 = data["rows"][0]["row"] if data["rows"] else data["settings"]
    shape = (
        "the full Qwen2.5-0.5B shape"
        if row0["layers"] == QWEN25_05B["num_hidden_layers"]
        else f"**{row0['layers']} layers, not the full 24: a smoke run**"
    )
    lines = [
        "# Benchmarks: bench-B (the largest model)",
        "",
        f"Generated by `{data['command']}` on {data['date']} in {data['wall_s'] / 60:.1f} minutes"
        + (
            f" ({len(data['resumed'])} result(s) reused from an earlier run with --resume, measured before and not "
            f"counted in that time: {', '.join(data['resumed'])})"
            if data.get("resumed")
            else ""
        )
        + "; do not edit by hand.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB memory, torch threads {row0['threads']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}.",
        "",
        f"Model: Qwen2 built from its config, {shape}: hidden 896, {row0['layers']} layers, 14 heads, 2 KV heads, "
        "intermediate 4,864, vocabulary 151,936, tied embeddings, random init, float32; the reference a frozen copy. "
        f"{BATCH} sequences per step, each exactly max_length tokens (72% prompt, 28% response, half positives); "
        f"{row0['warmup']} warm-up then {row0['measured']} measured steps; gradient checkpointing "
        f"{'on' if row0['gradient_checkpointing'] else 'off'} for both libraries. "
        "Each row runs in its own process, killed "
        f"once its resident memory passes {data['cap_gib']:.1f} GiB (recorded as out of memory).",
        "",
        "| row | max_length | s/step | tokens/s | peak RSS GiB | allocator |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        row = r["row"]
        if "error" in r:
            what = "out of memory" if r.get("out_of_memory") else "failed"
            lines.append(
                f"| {r['name']} | {row['max_length']} | {what}: {r['error'][:120]} | - | "
                f"{r.get('peak_rss_gib', 0):.2f} | {row['allocator']} |"
            )
        else:
            lines.append(
                f"| {r['name']} | {row['max_length']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_rss_gib']:.2f} | {row['allocator']} |"
            )
    ok = {r["row"]["impl"]: r for r in data["rows"] if "error" not in r}
    if "ours" in ok and "trl" in ok:
        o, t = ok["ours"], ok["trl"]
        lines += [
            "",
            f"ULMA against KTOTrainer: {t['s_per_step'] / o['s_per_step']:.2f}x the speed, "
            f"{o['peak_rss_gib'] / t['peak_rss_gib']:.2f}x the peak memory.",
        ]
    search = data.get("max_length_search")
    if search:
        lines += ["", "## Longest max_length ULMA trains at batch 8", ""]
        if "max_length" not in search:  # saved by a run that was stopped before the search ended
            fit = [p["row"]["max_length"] for p in search["probes"] if "error" not in p]
            oom = [p["row"]["max_length"] for p in search["probes"] if p.get("out_of_memory")]
            lines.append(
                "- **The search did not finish** (the run was stopped; `--resume` goes on): so far ULMA trains at "
                f"{max(fit) if fit else 'none of the lengths tried'}"
                + (f" and runs out of memory at {min(oom)}" if oom else "")
                + "."
            )
        else:
            found = search["max_length"]
            lines.append(
                f"- {found if found else 'none'} tokens, to {search['resolution']} tokens (up to {search['limit']}); "
                f"first failing: {search['first_failing'] or '- (none up to the limit)'}"
                + (f"; the search stopped: {search['stopped']}" if search["stopped"] else "")
                + "."
            )
        lines.append(
            f"- Each length is a probe in its own process: one warm-up step on {PROBE_WARMUP_LENGTH}-token sequences "
            "(it allocates AdamW's state, as in steady training), then one step at the length"
            + (f"; the first length is the row {search['started_from']} above" if search.get("started_from") else "")
            + ". The "
            "lengths tried extrapolate the measured peaks linearly to the cap, doubling before two fits and bisecting "
            "where the extrapolation overshoots; each verdict is a measured step."
        )
        for p in search["probes"]:
            lines.append(f"  - {line(p)}")
    notes = data.get("notes") or []
    if notes:
        lines += [""] + [f"- **{n}**" for n in notes]
    lines += [
        "",
        "- s/step: mean wall time of the measured steps (forward, loss, backward, optimizer step); tokens/s: "
        "the batch's tokens (8 x max_length) per second. peak RSS: the larger of the process's own high-water "
        "mark (VmHWM, including torch and the library's imports) and the parent's samples of its RSS. "
        "It depends on the order of allocations as well as their size: a row's warm-up step runs at full length "
        "before AdamW's state exists, a probe's on short sequences.",
    ]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import os

    import torch
    import transformers
    import trl

    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": pages / capped.GIB,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (default %(default)s)")
    parser.add_argument(
        "--layers",
        type=int,
        default=24,
        help="decoder layers (default %(default)s: Qwen2.5-0.5B; fewer for a smoke run)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up steps (default %(default)s: it allocates AdamW's state)"
    )
    parser.add_argument("--measured", type=int, default=2, help="measured steps (default %(default)s)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="run without gradient checkpointing")
    parser.add_argument("--only", choices=("ours", "trl"), default=None, help="run one library's row only")
    parser.add_argument(
        "--find-max-length", action="store_true", help="also search the longest max_length ULMA trains at batch 8"
    )
    parser.add_argument(
        "--max-length-limit", type=int, default=32768, help="the search stops here (default %(default)s)"
    )
    parser.add_argument("--resolution", type=int, default=256, help="the search's step (default %(default)s tokens)")
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=22.0,
        help="a row's process is killed above this RSS (default %(default)s)",
    )
    parser.add_argument(
        "--timeout-min", type=float, default=180.0, help="a row with no result after this long is recorded as failed"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    for impl, label in (("ours", "the library's"), ("trl", "TRL's")):
        parser.add_argument(
            f"--{impl}-allocator",
            choices=allocator.SETTINGS,
            default="default",
            help=f"allocator of {label} row (default %(default)s)",
        )
    parser.add_argument("--out", type=Path, default=DOCS, help="folder of benchmarks-b.md/json (default docs/)")
    parser.add_argument(
        "--report",
        action="store_true",
        help="only rewrite OUT/benchmarks-b.md from OUT/benchmarks-b.json (e.g. after a run was stopped)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the results in OUT/benchmarks-b.json measured with the same settings "
        "(each row and probe is saved as it ends)",
    )
    args = parser.parse_args(argv)
    for name in ("max_length", "layers", "measured", "resolution", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    path, report = args.out / "benchmarks-b.json", args.out / "benchmarks-b.md"
    if args.report:
        if not path.exists():
            parser.error(f"--report: {path} does not exist")
        report.write_text(markdown(json.loads(path.read_text())))
        print(f"wrote {report}")
        return 0
    started = time.perf_counter()
    jemalloc = allocator.find_jemalloc()
    notes = []
    for impl in ("ours", "trl"):
        settings, missing = allocator.resolve(getattr(args, f"{impl}_allocator"), jemalloc)
        setattr(args, f"{impl}_allocator", settings[0])
        if missing and missing not in notes:
            notes.append(missing)
            print(f"NOTE: {missing}")
    base = BRow(
        "ours",
        args.max_length,
        args.layers,
        not args.no_gradient_checkpointing,
        args.warmup,
        args.measured,
        threads=args.threads,
    )
    timeout = args.timeout_min * 60
    command = "PYTHONPATH=. python -m benchmarks.bench_b" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    earlier = on_record(path) if args.resume else []
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    resumed: list[str] = []

    def data() -> dict[str, Any]:
        return {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "cap_gib": args.memory_cap_gib,
            "settings": asdict(base),
            "rows": rows,
            "max_length_search": search
            if search is not None
            else ({"probes": probes, "complete": False} if probes else None),
            "notes": notes,
            "resumed": resumed,
            "wall_s": time.perf_counter() - started,
        }

    def run(row: BRow, into: list[dict[str, Any]]) -> dict[str, Any]:
        """A result on record (--resume) or a new measurement; saved at once, so a killed run keeps it."""
        result = next((r for r in earlier if same_row(r, row)), None)
        if result is None:
            result = run_row(row, args.memory_cap_gib, timeout, jemalloc)
        else:
            print(f"(from {path}, measured {result.get('measured_on', 'earlier')})")
            resumed.append(result["name"])
        into.append(result)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data(), indent=1) + "\n")
        print(line(result), flush=True)
        return result

    for impl in ("ours", "trl"):
        if args.only in (None, impl):
            run(replace(base, impl=impl, allocator=getattr(args, f"{impl}_allocator")), rows)
    if args.find_max_length:
        ours = replace(base, allocator=args.ours_allocator)
        first = next((r for r in rows if same_row(r, ours)), None)
        search = find_max_length(
            ours, lambda row: run(row, probes), args.memory_cap_gib, args.max_length_limit, args.resolution, first=first
        )
    path.write_text(json.dumps(data(), indent=1) + "\n")
    text = markdown(data())
    report.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
