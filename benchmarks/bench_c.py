"""bench-C: real weights on real data. SmolLM2-135M-Instruct on HH harmless-base, ULMA against TRL's KTOTrainer.

    python scripts/get_smollm2.py                                  # once: models/smollm2-135m-instruct
    PYTHONPATH=. python -m benchmarks.bench_c                      # every row; writes docs/benchmarks-c.{md,json}
    PYTHONPATH=. python -m benchmarks.bench_c --smoke --model DIR --out /tmp/bench-c   # seconds: 1 layer, 64 tokens,
                                                                                       # 1 step, in this process

Model: the folder ``scripts/get_smollm2.py`` writes (Q4_1 weights dequantised to float32; LlamaForCausalLM,
hidden 576, 30 layers, 9 heads, 3 KV heads, vocabulary 49,152, tied embeddings), float32, no gradient
checkpointing. Data: ``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` (``--data``), every chosen
(score 1) and rejected (score 0) response parsed and truncated by the library (prompt end kept),
shuffled with seed 0, tokenized with the model's own tokenizer; 8 sequences per step, max_length 512;
1 warm-up then 4 measured steps. Rows, each once per allocator (glibc's and jemalloc, where installed;
the report takes each row's fastest):

* ``ulma full``: ``ULMAModule`` (``training_step``, backward, AdamW), the reference a frozen copy;
* ``ulma lora``: LoRA r 16 (alpha 16, all linear layers), the reference the policy with adapters off;
* ``trl full``: TRL's ``KTOTrainer`` with a frozen reference copy (its KL sequences included);
* ``trl lora``: ``KTOTrainer`` with the same peft ``LoraConfig`` (TRL's reference: adapters off).

Each row runs in a fresh process under a resident-memory cap (``benchmarks/capped.py``); peak memory
is that process's peak RSS. MFU: the model FLOPs the step needs (``benchmarks/flops.py``; a LoRA step
counts forward + input-gradient backward, 2x the forward, for the frozen weights) per second, over the
float32 matmul peak measured on this machine before and after the rows (the best of those).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import allocator, capped
from benchmarks import flops as F
from benchmarks.workload import DATA_FILE, LR, REPO, SEED, Sample, ULMAStep

DOCS = REPO / "docs"
MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
BATCH = 8
LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
# issue 24's targets, on each library's best allocator
SPEED_TARGET, MEMORY_TARGET, MFU_TARGET = 2.0, 0.6, 0.45


@dataclass(frozen=True)
class CRow:
    """One bench-C measurement: ``impl`` (``ours``: ULMA, ``trl``: KTOTrainer), full or LoRA."""

    impl: str
    lora: bool = False
    allocator: str = "default"
    model: str = str(MODEL_DIR)
    data: str = str(DATA_FILE)
    max_length: int = 512
    layers: int | None = None  # None: the model's own; N: ``model`` is a copy of the first N layers (smoke runs)
    warmup: int = 1
    measured: int = 4
    threads: int = 2

    @property
    def name(self) -> str:
        lib = "ulma-lightning ULMA" if self.impl == "ours" else "TRL KTOTrainer"
        kind = "LoRA r16" if self.lora else "full"
        return f"{lib} {kind}{' ' + self.allocator if self.allocator != 'default' else ''}"

    @property
    def key(self) -> str:
        return f"{self.impl} {'lora' if self.lora else 'full'}"


def load_model(row: CRow) -> Any:
    """The float32 model of ``row.model``, in training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(row.model, dtype=torch.float32).train()


def first_layers(model_dir: Path, layers: int, out: Path) -> Path:
    """A copy of ``model_dir`` with its first ``layers`` layers only (their pretrained weights), and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers
    AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def samples(row: CRow, tokenizer_dir: str) -> list[Sample]:
    """``BATCH * steps`` HH samples, every chosen (1) and rejected (0), parsed, shuffled with seed 0 and
    tokenized by the library (``benchmarks.workload._encode``: its truncation, prompt end kept)."""
    import random

    from benchmarks.workload import _encode
    from ulma_lightning.data.errors import DataError
    from ulma_lightning.data.records import parse_pointwise
    from ulma_lightning.data.sources import Location

    with gzip.open(row.data, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    examples = []
    for i, record in enumerate(records):
        try:
            examples.extend(parse_pointwise(record, Location(row.data, i + 1), (0.0, 1.0)))
        except DataError:
            continue
    random.Random(SEED).shuffle(examples)
    need = BATCH * (row.warmup + row.measured)
    out: list[Sample] = []
    for start in range(0, len(examples), 64):
        chunk = examples[start : start + 64]
        for example, sample in zip(
            chunk, _encode([e.prompt for e in chunk], [e.response for e in chunk], row.max_length, tokenizer_dir)
        ):
            if sample is not None:
                sample.score = example.score
                out.append(sample)
        if len(out) >= need:
            return out[:need]
    raise ValueError(f"bench-C needs {need} samples, {row.data} gave {len(out)}")


class Ours(ULMAStep):
    """The library's ULMA step (as ``benchmarks/ours.py`` does for bench-A), full or LoRA; the module's
    own AdamW, lr 1e-5 (TRL's: the same)."""

    def __init__(self, row: CRow) -> None:
        from ulma_lightning import PolicyConfig
        from ulma_lightning.policy import LoraSettings

        lora = LoraSettings(**LORA) if row.lora else LoraSettings()
        super().__init__(PolicyConfig(model=row.model, reference="adapter" if row.lora else "copy", lora=lora), BATCH)


class Theirs:
    """TRL's KTOTrainer step (``benchmarks/trl_rows.py``), full or with a peft LoRA."""

    def __init__(self, row: CRow, tokenizer: Any) -> None:
        from benchmarks.trl_rows import TRLRow

        peft_config = None
        if row.lora:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=LORA["target_modules"],
                task_type="CAUSAL_LM",
            )
        model = load_model(row)
        self.row = TRLRow("kto", "copy", False, model, tokenizer, max_length=row.max_length, peft_config=peft_config)

    def collate(self, items: list[Sample]) -> list[dict[str, Any]]:
        return self.row.collate(items)

    def step(self, batch: dict[str, Any], index: int) -> float:
        return self.row.step(batch)


def step_flops(config: dict[str, Any], row: CRow, batch_samples: list[Sample]) -> float:
    """The model FLOPs one step needs (``benchmarks/flops.py``): ULMA's reference on negatives only,
    KTO's on all rows plus its KL rows (the next sample's response after each prompt, as TRL pairs
    them); a LoRA step's backward computes no weight gradients of the frozen base (2x forward, not 3x)."""
    seqs = [F.Seq(s.length, len(s.response_ids), s.score >= 1.0) for s in batch_samples]
    kl = None
    if row.impl == "trl":
        rotated = [batch_samples[-1]] + batch_samples[:-1]
        kl = [
            F.Seq(
                min(len(s.prompt_ids) + len(o.response_ids), row.max_length),
                min(len(o.response_ids), row.max_length - len(s.prompt_ids)),
                True,
            )
            for s, o in zip(batch_samples, rotated)
        ]
    total = F.needed_flops(config, "ulma" if row.impl == "ours" else "kto", "copy", seqs, kl)
    if row.lora:
        total -= F.forward_flops(config, seqs)
    return total


def measure(row: CRow) -> dict[str, Any]:
    """Build the row, run its steps, time the measured ones (in the row's own process)."""
    import math

    import torch

    from benchmarks import memory
    from ulma_lightning.tokenizers import load_tokenizer

    torch.set_num_threads(row.threads)
    memory.reset_peak()
    tokenizer = load_tokenizer(row.model)
    started = time.perf_counter()
    items = samples(row, row.model)
    runner: Any = Ours(row) if row.impl == "ours" else Theirs(row, tokenizer)
    batches = runner.collate(items)
    build_s = time.perf_counter() - started
    config = load_config(row)
    walls, losses = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        losses.append(runner.step(batch, i))
        walls.append(time.perf_counter() - start)
        print(f"  {row.name}: step {i + 1}/{len(batches)} {walls[-1]:.1f} s", flush=True)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")
    timed = range(row.warmup, len(batches)) if len(batches) > row.warmup else range(len(batches) - 1, len(batches))
    wall = sum(walls[i] for i in timed)
    tokens = sum(s.length for i in timed for s in items[i * BATCH : (i + 1) * BATCH])
    needed = sum(step_flops(config, row, items[i * BATCH : (i + 1) * BATCH]) for i in timed)
    return {
        "s_per_step": wall / len(timed),
        "tokens_per_s": tokens / wall,
        "achieved_flops": needed / wall,
        "needed_flops_per_step": needed / len(timed),
        "tokens_per_step": tokens / len(timed),
        "step_wall_s": walls,
        "losses": losses,
        "build_s": build_s,
        "process_peak_rss_gib": memory.peak_mb() / 1024,
        "allocator_loaded": allocator.loaded(),
        "loadavg": os.getloadavg(),
    }


def load_config(row: CRow) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(row.model).to_dict()


def run_row(
    row: CRow, cap_gib: float, timeout_s: float, jemalloc: str | None, in_process: bool = False
) -> dict[str, Any]:
    """One row in a fresh process under the memory cap (or, ``in_process``, here: smoke runs); its result."""
    if in_process:
        try:
            result = measure(row)
        except Exception as exc:  # a failed row is a result, as in a child process
            result = {"error": f"{type(exc).__name__}: {exc}"}
    else:
        with allocator.applied(row.allocator, jemalloc):
            result = capped.run_capped(measure, row, int(cap_gib * capped.GIB), timeout_s=timeout_s)
    if "process_peak_rss_gib" in result:
        result["peak_rss_gib"] = max(result["process_peak_rss_gib"], result.get("polled_peak_rss_gib", 0.0))
    return {"row": asdict(row), "name": row.name, "measured_on": time.strftime("%Y-%m-%d %H:%M"), **result}


def matmul_peak(threads: int, size: int = 2048) -> float:
    """The float32 matmul peak of this machine at ``threads`` threads (best of 3 tries of ``size``-square matmuls)."""
    import torch

    torch.set_num_threads(threads)
    return max(F.matmul_peak(torch.float32, size=size) for _ in range(3))


# ------------------------------------------------------------------ report
def best(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each row kind's fastest successful result over its allocators."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "error" in r:
            continue
        key = CRow(**r["row"]).key
        if key not in out or r["tokens_per_s"] > out[key]["tokens_per_s"]:
            out[key] = r
    return out


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """Ratios against TRL (ours over theirs, full against full and LoRA against LoRA) and MFU, with the targets."""
    peak = data["matmul_peak_fp32"]
    fastest = best(data["rows"])
    out: dict[str, Any] = {"mfu": {k: r["achieved_flops"] / peak for k, r in fastest.items()}, "ratios": {}}
    for kind in ("full", "lora"):
        ours, theirs = fastest.get(f"ours {kind}"), fastest.get(f"trl {kind}")
        if ours and theirs:
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            memory = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
            out["ratios"][kind] = {
                "speed": speed,
                "memory": memory,
                "speed_met": speed >= SPEED_TARGET,
                "memory_met": memory <= MEMORY_TARGET,
            }
    return out


def markdown(data: dict[str, Any]) -> str:
    m, s = data["machine"], data["settings"]
    smoke = s["layers"] is not None
    facts = summary(data)
    described = (
        "**a smoke run: the first " + str(s["layers"]) + " layers only**"
        if smoke
        else "SmolLM2-135M-Instruct, Q4_1 dequantised to float32"
    )
    lines = [
        "# Benchmarks: bench-C (a real pretrained model on real data)",
        "",
        f"Generated by `{data['command']}` on {data['date']} in {data['wall_s'] / 60:.1f} minutes; "
        "do not edit by hand.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {s['threads']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}. "
        f"Measured float32 matmul peak: {data['matmul_peak_fp32'] / 1e9:.0f} GFLOP/s.",
        "",
        f"Model: `{data.get('model_source', s['model'])}` ({described}), "
        f"float32, no gradient checkpointing. Data: `{Path(s['data']).name}`, {BATCH} sequences per step, "
        f"max_length {s['max_length']}, "
        f"{s['warmup']} warm-up then {s['measured']} measured steps; AdamW lr {LR}. "
        f"LoRA: r {LORA['r']}, alpha {LORA['alpha']}, all linear layers, "
        "reference = the policy with adapters off (both libraries).",
        "",
        "| row | allocator | s/step | tokens/s | peak RSS GiB | MFU (fp32) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        row = r["row"]
        if "error" in r:
            what = "out of memory" if r.get("out_of_memory") else "failed"
            lines.append(
                f"| {r['name']} | {row['allocator']} | {what}: {r['error'][:120]} | - | "
                f"{r.get('peak_rss_gib', 0):.2f} | - |"
            )
        else:
            lines.append(
                f"| {r['name']} | {row['allocator']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_rss_gib']:.2f} | {r['achieved_flops'] / data['matmul_peak_fp32']:.0%} |"
            )
    lines += ["", "## Against the targets (each row at its fastest allocator)", ""]
    for kind, ratio in facts["ratios"].items():
        lines.append(
            f"- {kind}: ULMA {ratio['speed']:.2f}x KTOTrainer's tokens/s "
            f"(target >= {SPEED_TARGET:.0f}x: {'met' if ratio['speed_met'] else 'missed'}), "
            f"{ratio['memory']:.2f}x its peak memory "
            f"(target <= {MEMORY_TARGET}x: {'met' if ratio['memory_met'] else 'missed'})."
        )
    for key, mfu in sorted(facts["mfu"].items()):
        lines.append(
            f"- MFU {key}: {mfu:.0%}"
            + (
                f" (target >= {MFU_TARGET:.0%}: {'met' if mfu >= MFU_TARGET else 'missed'})"
                if key == "ours full"
                else ""
            )
            + "."
        )
    notes = data.get("notes") or []
    lines += [""] + [f"- **{n}**" for n in notes] + ([""] if notes else [])
    lines += [
        "- tokens/s: non-pad tokens of the 8 training sequences per second (KTO's KL sequences not counted); "
        "s/step: forward, loss, backward and optimizer step. Peak RSS: the row's process, imports included. "
        "MFU: the model FLOPs a step needs (`benchmarks/flops.py`: ULMA's reference forward on negatives only, "
        "KTO's on every row plus its KL sequences; a LoRA step's backward without the frozen weights' gradients) "
        "over the measured matmul peak.",
        "- CPU users: set torch's threads to the cores that are free (`OMP_NUM_THREADS`); on a busy machine, "
        "more threads than free cores slow every step badly "
        "(issue 24 measured 189 tokens/s on 2 quiet cores and 15 under load with 2 threads).",
    ]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        type=Path,
        default=MODEL_DIR,
        help="the model folder (default %(default)s, from scripts/get_smollm2.py)",
    )
    parser.add_argument(
        "--data", type=Path, default=DATA_FILE, help="HH-RLHF transcripts, .jsonl.gz (default %(default)s)"
    )
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence at most (default %(default)s)")
    parser.add_argument(
        "--layers", type=int, default=None, help="keep the model's first N layers (a smoke run; default: all)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default %(default)s)")
    parser.add_argument("--measured", type=int, default=4, help="measured steps (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument(
        "--allocator",
        choices=allocator.CHOICES,
        default="both",
        help="allocators to measure each row with (default %(default)s; the report takes each row's fastest)",
    )
    parser.add_argument("--only", choices=("ours", "trl"), default=None, help="one library's rows only")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=22.0,
        help="a row's process is killed above this RSS (default %(default)s)",
    )
    parser.add_argument(
        "--timeout-min", type=float, default=60.0, help="a row with no result after this long is recorded as failed"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the rows in this process, one after another (no memory cap; smoke runs and tests)",
    )
    parser.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="side of the square matmuls that measure the float32 peak (default %(default)s)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 layer, max_length 64, 0+1 steps, default allocator, a small peak matmul, in this process (seconds)",
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="folder of benchmarks-c.md/json (default docs/)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.max_length, args.warmup, args.measured, args.allocator, args.in_process = (
            args.layers or 1,
            64,
            0,
            1,
            "default",
            True,
        )
        args.peak_size = min(args.peak_size, 256)
    if not (args.model / "config.json").is_file():
        print(
            f"bench-C skipped: no model folder at {args.model}; "
            "run `python scripts/get_smollm2.py` first (or pass --model)"
        )
        return 0
    if not args.data.is_file():
        print(f"bench-C skipped: no HH file at {args.data} (../shared/data/hh-rlhf/ beside the repository, or --data)")
        return 0
    started = time.perf_counter()
    jemalloc = allocator.find_jemalloc()
    settings, missing = allocator.resolve(args.allocator, jemalloc)
    notes = [missing] if missing else []
    if args.in_process and settings != ["default"]:
        notes.append("rows ran in one process (--in-process): only the allocator it started with was measured")
        settings = ["default"]
    for message in notes:
        print(f"NOTE: {message}")
    model_dir = args.model
    if args.layers is not None:  # the rows load a copy with the first layers only
        model_dir = first_layers(args.model, args.layers, Path(tempfile.mkdtemp(prefix="bench-c-model-")))
    base = CRow(
        "ours",
        model=str(model_dir),
        data=str(args.data),
        max_length=args.max_length,
        layers=args.layers,
        warmup=args.warmup,
        measured=args.measured,
        threads=args.threads,
    )
    rows = [
        replace(base, impl=impl, lora=lora, allocator=setting)
        for impl in ("ours", "trl")
        if args.only in (None, impl)
        for lora in ((False,) if args.no_lora else (False, True))
        for setting in settings
    ]
    command = "PYTHONPATH=. python -m benchmarks.bench_c" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    peaks = [matmul_peak(args.threads, args.peak_size)]
    results: list[dict[str, Any]] = []
    path, report = args.out / "benchmarks-c.json", args.out / "benchmarks-c.md"

    def data() -> dict[str, Any]:
        return {
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "settings": asdict(base),
            "model_source": str(args.model),
            "matmul_peak_fp32": max(peaks),
            "matmul_peak_runs": peaks,
            "rows": results,
            "notes": notes,
            "wall_s": time.perf_counter() - started,
        }

    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        results.append(run_row(row, args.memory_cap_gib, args.timeout_min * 60, jemalloc, in_process=args.in_process))
        last = results[-1]
        print(
            f"{last['name']}: "
            + (
                f"FAILED {last['error']}"
                if "error" in last
                else f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_rss_gib']:.2f} GiB"
            ),
            flush=True,
        )
        path.write_text(json.dumps(data(), indent=1) + "\n")  # saved as each row ends
    peaks.append(matmul_peak(args.threads, args.peak_size))
    if model_dir != args.model:
        shutil.rmtree(model_dir, ignore_errors=True)
    final = data()
    final["summary"] = summary(final)
    path.write_text(json.dumps(final, indent=1) + "\n")
    text = markdown(final)
    report.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
