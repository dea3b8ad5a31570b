"""Where a training step's time goes: torch.profiler over bench-A steps, grouped by kind of op.

    PYTHONPATH=. python -m benchmarks.profile_step                  # ULMA and TRL KTO, float32
    PYTHONPATH=. python -m benchmarks.profile_step --rows "ours ulma fp32" --steps 3

Each row is profiled in its own process (as in bench-A) over ``--steps`` measured steps after one
warm-up step; the summary goes to stdout and, with ``--out``, to a markdown file.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.rows import Row

CATEGORIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("optimizer", ("_fused_adamw", "_fused_adam", "adamw", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("softmax/log-sum-exp", ("logsumexp", "log_softmax", "_softmax", "aten::exp", "aten::exp_", "amax", "aten::log")),
    ("copies/casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::index", "aten::gather", "aten::scatter", "index_put", "index_add", "aten::clone", "aten::fill_", "aten::zero_", "masked")),
]


def _category(name: str) -> str:
    for category, keys in CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "other elementwise"


def profile_row(spec: tuple[Row, int]) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from benchmarks import workload
    from benchmarks.rows import _kind

    row, steps = spec
    torch.set_num_threads(workload.THREADS)
    data = workload.build_samples()
    per_step = workload.BATCH_SIZE // 2 if row.method == "dpo" else workload.BATCH_SIZE
    samples = data[_kind(row.method)][: per_step * (steps + 1)]
    bf16 = row.precision == "bf16"
    if row.impl == "ours":
        from benchmarks.ours import OurRow

        runner: Any = OurRow(row.method, row.reference, bf16, data["tokenizer"])
        step = runner.step
    else:
        from benchmarks.trl_rows import TRLRow

        runner = TRLRow(row.method, row.reference, bf16, workload.build_model(), AutoTokenizer.from_pretrained(data["tokenizer"]))
        step = lambda batch, i: runner.step(batch)  # noqa: E731
    batches = runner.collate(samples)
    from benchmarks.quiet import wait_quiet

    step(batches[0], 0)
    wall = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, batch in enumerate(batches[1:], 1):
            with torch.profiler.record_function("wait for a quiet machine"):
                wait_quiet(5.0)
            start = time.perf_counter()
            step(batch, i)
            wall += time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0 or event.key == "wait for a quiet machine":
            continue
        totals[_category(event.key)] += event.self_cpu_time_total / 1e6
        ops.append((event.key, event.self_cpu_time_total / 1e6, event.count))
    ops.sort(key=lambda x: -x[1])
    return {"name": row.name, "wall_s": wall, "steps": steps, "categories": dict(totals), "top": ops[:15]}


def render(results: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        total = sum(r["categories"].values())
        out.append(f"### {r['name']}: {r['wall_s'] / r['steps']:.2f} s/step (profiled, {r['steps']} steps)\n")
        out.append("| kind of op | self CPU s/step | share |\n|---|---:|---:|")
        for name, seconds in sorted(r["categories"].items(), key=lambda x: -x[1]):
            out.append(f"| {name} | {seconds / r['steps']:.3f} | {seconds / total:.0%} |")
        out.append("\n| top ops | self CPU s/step | calls/step |\n|---|---:|---:|")
        for name, seconds, count in r["top"]:
            out.append(f"| `{name[:60]}` | {seconds / r['steps']:.3f} | {count / r['steps']:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["ours ulma fp32", "trl kto fp32"], help='"IMPL METHOD PRECISION [precomputed]"')
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks.bench_a import in_child

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["benchmarks.preload"])
    results = []
    for text in args.rows:
        impl, method, precision, *rest = text.split()
        reference = "precomputed" if rest else ("none" if method == "sft" else "copy")
        results.append(in_child(ctx, profile_row, (Row(impl, method, reference, precision), args.steps)))
    markdown = render(results)
    print(markdown)
    if args.out:
        args.out.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
