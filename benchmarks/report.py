"""Ratios, targets and the markdown of docs/benchmarks.md, from the rows' raw results."""

from __future__ import annotations

from typing import Any

from benchmarks import workload

TRL_PEER = {"ulma": "kto", "pointwise_dpo": "kto", "kto": "kto", "dpo": "dpo", "sft": "sft"}
LABEL = {"ulma": "ULMA", "pointwise_dpo": "point-wise DPO", "dpo": "DPO", "sft": "SFT", "kto": "KTO"}

# (our method, reference, TRL method, minimum tokens/s ratio) -- issue 6, on the float32 rows
SPEED_TARGETS = [
    ("ulma", "copy", "kto", 3.0),
    ("ulma", "precomputed", "kto", 4.0),
    ("pointwise_dpo", "copy", "kto", 2.0),
    ("dpo", "copy", "dpo", 1.5),
    ("dpo", "precomputed", "dpo", 2.0),
    ("sft", "none", "sft", 1.4),
]
MEMORY_TARGET = 0.6
MFU_TARGET = 0.40


def workload_description() -> dict[str, Any]:
    return {
        "name": "bench-A",
        "data": "HH-RLHF harmless-base test (../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)",
        "tokenizer": f"byte-level BPE, vocab {workload.VOCAB_SIZE}, trained on the transcripts",
        "model": workload.MODEL_CONFIG,
        "max_length": workload.MAX_LENGTH,
        "sequences_per_step": workload.BATCH_SIZE,
        "warmup_steps": workload.WARMUP_STEPS,
        "measured_steps": workload.MEASURED_STEPS,
        "lr": workload.LR,
        "threads": workload.THREADS,
    }


def _key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    r = row["row"]
    return r["impl"], r["method"], r["reference"], r["precision"]


def allocator_of(row: dict[str, Any]) -> str:
    return row["row"].get("allocator", "default")


def _ratios(r: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """The library's row ``r`` over the TRL row ``peer``."""
    common = sorted(set(r.get("quiet_step_indices", [])) & set(peer.get("quiet_step_indices", [])))
    quiet_ratio = None
    if len(common) >= 3:  # the same batches, both quiet: a like-for-like ratio
        quiet_ratio = sum(peer["step_wall_s"][j] for j in common) / sum(r["step_wall_s"][j] for j in common)
    return {
        "quiet_steps_compared": len(common),
        "tokens_per_s_quiet_steps": quiet_ratio,
        "row": peer["name"],
        "allocator": allocator_of(peer),
        "tokens_per_s": r["tokens_per_s"] / peer["tokens_per_s"],
        "cpu_tokens_per_s": r["cpu_tokens_per_s"] / peer["cpu_tokens_per_s"],
        "train_mb": r["train_mb"] / peer["train_mb"],
        "peak_rss_mb": r["peak_rss_mb"] / peer["peak_rss_mb"],
    }


def fastest(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Per (library, method, reference, precision): the row of the fastest allocator setting (tokens/s)."""
    best: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        if "error" not in r and (_key(r) not in best or r["tokens_per_s"] > best[_key(r)]["tokens_per_s"]):
            best[_key(r)] = r
    return best


def annotate(data: dict[str, Any]) -> None:
    """Add MFU, TRL ratios, target verdicts and the scaling slopes to ``data`` in place.

    Each row may be measured with several allocator settings (``row.allocator``). ``vs_trl`` (the
    headline) compares a library row with TRL at its fastest setting (the tuned peer);
    ``vs_trl_default`` with TRL on the default allocator (the untuned peer). The targets use each
    library's fastest setting. ``fastest_setting`` marks the row of its library's fastest setting.
    """
    peaks = data["matmul_peak_flops"]
    best = fastest(data["rows"])
    by_key = best
    defaults = {_key(r): r for r in data["rows"] if "error" not in r and allocator_of(r) == "default"}
    table_rows = {id(r) for r in data["rows"]}
    for r in data["rows"] + data["scaling"] + data.get("alone", []):
        if "error" in r:
            continue
        r["mfu"] = r["achieved_flops"] / peaks[r["row"]["precision"]]
        if id(r) in table_rows:
            r["fastest_setting"] = best.get(_key(r)) is r
        impl, method, reference, precision = _key(r)
        if impl != "ours" or id(r) not in table_rows:
            continue
        peer_key = ("trl", TRL_PEER[method], reference, precision)
        if peer_key in best:
            r["vs_trl"] = _ratios(r, best[peer_key])
        if peer_key in defaults:
            r["vs_trl_default"] = _ratios(r, defaults[peer_key])
    targets = []
    for method, reference, peer, need in SPEED_TARGETS:
        ours = by_key.get(("ours", method, reference, "fp32"))
        got = ours.get("vs_trl", {}).get("tokens_per_s") if ours else None
        suffix = " +precomputed" if reference == "precomputed" else ""
        targets.append(
            {
                "target": f"{LABEL[method]}{suffix} vs TRL {peer.upper()}Trainer{suffix}: tokens/s >= {need}x",
                "value": got,
                "met": got is not None and got >= need,
            }
        )
    for r in data["rows"]:
        if "vs_trl" in r and r.get("fastest_setting"):
            got = r["vs_trl"]["train_mb"]
            targets.append(
                {
                    "target": f"memory {r['name']} vs {r['vs_trl']['row']}: <= {MEMORY_TARGET}x",
                    "value": got,
                    "met": got <= MEMORY_TARGET,
                }
            )
    alone = next(
        (r for r in data.get("alone", []) if "error" not in r and _key(r) == ("ours", "ulma", "copy", "fp32")), None
    )
    grouped = by_key.get(("ours", "ulma", "copy", "fp32"))
    for label, row in (
        ("timed alone, as the matmul peak is", alone),
        ("interleaved with TRL's KTOTrainer, the table's row", grouped),
    ):
        if row is not None:
            mfu = row.get("mfu")
            targets.append(
                {
                    "target": f"ULMA float32 MFU >= {MFU_TARGET:.0%} of the measured float32 matmul peak ({label})",
                    "value": mfu,
                    "met": mfu is not None and mfu >= MFU_TARGET,
                }
            )
    data["targets"] = targets
    data["scaling_summary"] = _scaling_summary(data["scaling"])


def _slope(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def _scaling_summary(scaling: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares MB per 1k tokens of sequence length, per vocabulary, and their ratio."""
    out: dict[str, Any] = {}
    for vocab in sorted({r["row"]["vocab"] for r in scaling}):
        points = [
            (r["row"]["max_length"], r["train_mb"]) for r in scaling if r["row"]["vocab"] == vocab and "error" not in r
        ]
        slope = _slope(points)
        out[str(vocab)] = {"mb_per_1k_tokens": None if slope is None else slope * 1000}
        if slope is not None and len(points) > 2:
            fitted = [(x, out[str(vocab)]["mb_per_1k_tokens"] / 1000 * x) for x, _ in points]
            intercept = sum(y for _, y in points) / len(points) - slope * sum(x for x, _ in points) / len(points)
            out[str(vocab)]["max_residual_mb"] = max(abs(y - (intercept + slope * x)) for x, y in points)
            del fitted
    slopes = [v["mb_per_1k_tokens"] for v in out.values() if v["mb_per_1k_tokens"]]
    if len(slopes) == 2:
        vocabs = sorted(int(v) for v in out)
        out["slope_ratio"] = slopes[1] / slopes[0]
        out["vocab_ratio"] = vocabs[1] / vocabs[0]
    return out


# ------------------------------------------------------------------ markdown
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(data: dict[str, Any]) -> str:
    lines = [
        "| row | allocator | tokens/s | s/step | MFU | train MB | peak RSS MB | quiet steps | tokens/s vs tuned TRL "
        "| same, quiet steps only | same, CPU time | train MB vs tuned TRL | tokens/s vs TRL, default allocator |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {allocator_of(r)} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        vs, untuned = r.get("vs_trl", {}), r.get("vs_trl_default", {})
        x = lambda key, d=vs: f"{d[key]:.2f}x" if d.get(key) is not None else "-"  # noqa: E731
        quiet = x("tokens_per_s_quiet_steps") + (
            f" ({vs['quiet_steps_compared']})" if vs.get("tokens_per_s_quiet_steps") is not None else ""
        )
        tuned = f" ({vs['allocator']})" if vs else ""
        setting = allocator_of(r) + (" *" if r.get("fastest_setting") else "")
        lines.append(
            f"| {r['name']} | {setting} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {r['mfu']:.1%} | "
            f"{r['train_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['row']['measured'] - r['disturbed_steps']}/{r['row']['measured']} | {x('tokens_per_s')}{tuned} | "
            f"{quiet} | {x('cpu_tokens_per_s')} | {x('train_mb')} | "
            f"{x('tokens_per_s', untuned)} |"
        )
    return "\n".join(lines)


def allocator_text(data: dict[str, Any]) -> str:
    """Which allocator settings were measured, which was fastest for each library, and why it matters."""
    info = data.get("allocator") or {"ours": ["default"], "trl": ["default"], "jemalloc": None, "notes": []}
    conf = info.get("malloc_conf", "dirty_decay_ms:-1,muzzy_decay_ms:-1")

    def listed(impl: str) -> str:
        return " and ".join(f"`{s}`" for s in info[impl])

    lines = [
        f"- allocator: the library's rows were measured with {listed('ours')}, TRL's with {listed('trl')} "
        f"(`--ours-allocator`, `--trl-allocator`: `default`, `jemalloc` or `both`). `default` is glibc's malloc; "
        f"`jemalloc` is {info.get('jemalloc') or 'libjemalloc.so.2'} through `LD_PRELOAD` with `MALLOC_CONF={conf}` "
        "(freed memory is kept for reuse, never handed back to the OS), set when the row's process starts. "
        "With glibc, a step that makes and frees large tensors (TRL's batch x sequence x vocabulary logits) "
        "returns them to the OS and faults them in again on the next step, so much of its time is the kernel's. "
        'A `*` marks the faster setting of each row; the headline ratios ("vs tuned TRL", and the targets) '
        "compare each library at its fastest setting; the last column keeps the ratio against TRL on the "
        "default allocator, and the rows of the slower setting stay in the table.",
    ]
    for message in info.get("notes", []):
        lines.append(f"- **{message}**")
    best = fastest(data["rows"])
    gains = []
    for key, r in best.items():
        others = [o for o in data["rows"] if "error" not in o and _key(o) == key and o is not r]
        for o in others:
            gains.append(
                f"{r['name'].removesuffix(' ' + allocator_of(r))}: {allocator_of(r)} "
                f"{o['s_per_step'] / r['s_per_step']:.2f}x as fast as {allocator_of(o)}"
            )
    if gains:
        lines.append("- fastest setting per row: " + "; ".join(gains) + ".")
    return "\n".join(lines)


def alone_text(data: dict[str, Any]) -> str:
    """The ULMA row timed alone, next to the same row interleaved with TRL's."""
    alone = [r for r in data.get("alone", []) if "error" not in r]
    grouped = {r["name"]: r for r in data["rows"] if "error" not in r}
    lines = []
    for r in alone:
        same = grouped.get(r["name"].removesuffix(" alone"))
        versus = (
            f"; interleaved with TRL's steps (the table's row): {same['s_per_step']:.2f} s/step, MFU {same['mfu']:.1%}"
            if same
            else ""
        )
        lines.append(
            f"- {r['name']} ({r['row']['warmup']} + {r['row']['measured']} steps in a group of its own, "
            "right after the first matmul peak run): "
            f"{r['tokens_per_s']:.0f} tokens/s, {r['s_per_step']:.2f} s/step, MFU {r['mfu']:.1%}, "
            f"train {r['train_mb']:.0f} MB{versus}."
        )
    for r in data.get("alone", []):
        if "error" in r:
            lines.append(f"- {r['name']}: failed: {r['error']}")
    return "\n".join(lines)


def targets_table(data: dict[str, Any]) -> str:
    lines = [
        "| target (float32 rows, each library at its fastest allocator setting; memory: all pairs) | reached | met |",
        "|---|---:|:---:|",
    ]
    for t in data["targets"]:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.1%}" if "MFU" in t["target"] else f"{value:.2f}x")
        lines.append(f"| {t['target']} | {shown} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def scaling_table(data: dict[str, Any]) -> str:
    lines = [
        "| vocab | max_length | tokens/s | s/step | peak RSS MB | train MB | MFU |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["scaling"]:
        row = r["row"]
        if "error" in r:
            lines.append(f"| {row['vocab']} | {row['max_length']} | failed: {r['error'][:60]} | | | | |")
            continue
        lines.append(
            f"| {row['vocab']} | {row['max_length']} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['train_mb']:.0f} | {r['mfu']:.1%} |"
        )
    summary = data.get("scaling_summary", {})
    notes = []
    for vocab, s in summary.items():
        if vocab.isdigit() and s.get("mb_per_1k_tokens") is not None:
            notes.append(
                f"vocab {int(vocab):,}: {s['mb_per_1k_tokens']:.0f} MB per 1k tokens of max_length "
                f"(least squares; largest residual {s.get('max_residual_mb', 0):.0f} MB)"
            )
    if "slope_ratio" in summary:
        notes.append(
            f"slope ratio 128k/32k = {summary['slope_ratio']:.2f} for a {summary['vocab_ratio']:.0f}x vocabulary "
            f"(a vocab x sequence term would make it about {summary['vocab_ratio']:.0f})"
        )
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def omp_policy(data: dict[str, Any]) -> str:
    ours, trl = data["omp_wait_policy"]["ours"], data["omp_wait_policy"]["trl"]

    def say(policy: str) -> str:
        return "left at OpenMP's default (unset)" if policy == "default" else f"`{policy}`"

    if ours == trl:
        return f"{say(ours)} for every row, TRL's and the library's"
    return f"{say(ours)} for the library's rows and {say(trl)} for TRL's"


def markdown(data: dict[str, Any]) -> str:
    m, w, peaks = data["machine"], data["workload"], data["matmul_peak_flops"]
    loads = [r["loadavg"][0] for r in data["rows"] + data["scaling"] if "loadavg" in r]
    model = ", ".join(f"{k}={v}" for k, v in w["model"].items() if k != "model_type")
    return f"""# Benchmarks

Generated by `{data["command"]}` in {data["wall_s"] / 60:.1f} minutes; do not edit by hand (the run
rewrites this file and `docs/benchmarks.json`, which holds every per-step time).

Machine: {m["cpu"]}, {m["cores"]} cores, torch threads {m["threads"]}; Python {m["python"]}, torch {m["torch"]},
transformers {m["transformers"]}, TRL {m["trl"]}. Measured matmul peak (2048^2 `torch.mm`, best of the runs
before and after the rows): float32 {peaks["fp32"] / 1e9:.0f} GFLOP/s, bfloat16 {peaks["bf16"] / 1e9:.0f} GFLOP/s.
1-minute load average during the rows: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} \
(the machine may be shared; see the notes).

## bench-A

{w["data"]}; tokenizer: {w["tokenizer"]}; model: Llama, {model}, random init (seed 0), reference a
frozen copy; max_length {w["max_length"]}; {w["sequences_per_step"]} sequences per step (4 pairs for DPO);
AdamW lr {w["lr"]}; {w["warmup_steps"]} warm-up steps then {w["measured_steps"]} measured. ULMA, point-wise DPO
and KTO train on the same point-wise batches (every chosen with score 1 and rejected with score 0,
shuffled with seed 0), DPO on (prompt, chosen, rejected) pairs, SFT on (prompt, chosen).

{table(data)}

{alone_text(data)}

{allocator_text(data)}

- tokens/s: non-pad tokens of the training sequences per second of wall time over the measured
  steps (KTO's mismatched KL sequences are not counted). s/step: mean wall time of a measured step
  (forward, loss, backward, optimizer step). The rows compared with each other are timed step by
  step in turn (the order rotating each step), each in its own process, so a slow spell of the
  machine hits them alike.
- peak RSS: high-water mark of the row's own process, from just before it builds the row (model,
  reference, optimizer, trainer, batches) to the end of its last step. Every process has imported
  torch, transformers, TRL and the library before that point, so the baseline is the same for all.
  train MB: the peak above that baseline (weights, reference, optimizer state, activations,
  batches, and what the allocator kept between steps); the memory ratios use it.
- MFU: FLOPs the method needs (see `benchmarks/flops.py`: backbone on every non-pad token, vocabulary
  projection on response tokens only, reference forwards only where the loss uses them) per second,
  over the float32 or bfloat16 matmul peak above. The same count is used for a method on both
  libraries. The MFU target is shown for ULMA timed alone (under the table), with no other row
  between its steps, as the peak is measured, and for the table's row, whose steps alternate with
  TRL's KTOTrainer's; the two differ by the machine's run-to-run spread (10-20% per step here).
- vs TRL: the library's row over the TRL row with the same method family (ULMA, point-wise DPO
  and KTO against `KTOTrainer`), reference mode and precision, measured in the same invocation,
  TRL at its fastest allocator setting (named in brackets; the last column: TRL on the default allocator).
  "quiet steps only": the same ratio over the measured steps (same batches) that both rows ran on
  a quiet machine, with their count; "CPU time": each side's process CPU time in place of wall time.
- quiet steps: measured steps during which other processes (any container on the machine) used
  under 0.25 of a core. Before each timed step the benchmark waits for such a moment (up to 10 s,
  then 1 s while a busy spell lasts), and runs a step once more if a neighbour started during it
  (`benchmarks/quiet.py`): with 2 threads on 2 cores, a busy neighbour stalls every parallel region,
  which slows a step of many small ops (the library's) far more than one of a few large ones (TRL's).
- OpenMP: `OMP_WAIT_POLICY` {omp_policy(data)} (choose with `--ours-omp-wait-policy` and
  `--trl-omp-wait-policy`). With OpenMP's default a thread that finishes a parallel region spins a
  moment before it sleeps, so it starts the next of a step's many small regions at once; with
  `PASSIVE` it sleeps and must be woken. Measured while preparing this run (both rows of each
  library side by side in this harness, batches 2-6 after 2 warm-up steps, quiet machine):
  ULMA 0.73 s per step with the default against 1.18 s with `PASSIVE`; TRL's KTOTrainer 14.3 s
  against 15.3 s. Next to a neighbour busy on the other core, spinning threads stall each other and
  `PASSIVE` is the faster (an earlier run: ULMA 1.0-1.4 s against 3.7-4.6 s per step).

## Targets (issue 6)

{targets_table(data)}

## Scaling (ULMA, float32, reference copy)

Every sequence exactly `max_length` real HH tokens (72% prompt, 28% response, half positives), 8
per step, {data["scaling"][0]["row"]["warmup"] if data["scaling"] else 1} warm-up and \
{data["scaling"][0]["row"]["measured"] if data["scaling"] else 2} measured steps.

{scaling_table(data)}
"""
