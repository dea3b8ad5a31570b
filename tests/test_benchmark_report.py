"""benchmarks/report.py on synthetic results: ratios to TRL, target verdicts, the MFU rows, the text.

Nothing here is timed; it checks the arithmetic and wording that docs/benchmarks.md is built from.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from benchmarks import report
from benchmarks.rows import Row

PEAK = 100e9


def result(
    row: Row, s_per_step: float, train_mb: float, flops_per_step: float = 40e9, tokens_per_step: float = 1000.0
) -> dict[str, Any]:
    walls = [s_per_step] * row.steps
    return {
        "row": asdict(row),
        "name": row.name,
        "tokens_per_s": tokens_per_step / s_per_step,
        "s_per_step": s_per_step,
        "cpu_tokens_per_s": tokens_per_step / (2 * s_per_step),
        "achieved_flops": flops_per_step / s_per_step,
        "train_mb": train_mb,
        "peak_rss_mb": train_mb + 350,
        "step_wall_s": walls,
        "quiet_step_indices": list(range(row.warmup, row.steps)),
        "disturbed_steps": 0,
    }


def synthetic(ours_s: float = 1.0, alone_s: float = 0.8) -> dict[str, Any]:
    trl, ours = Row("trl", "kto"), Row("ours", "ulma")
    return {
        "matmul_peak_flops": {"fp32": PEAK, "bf16": 2 * PEAK},
        "rows": [result(trl, 10.0, 5000), result(ours, ours_s, 700)],
        "alone": [result(Row("ours", "ulma", alone=True), alone_s, 690)],
        "scaling": [],
        "omp_wait_policy": {"ours": "default", "trl": "default"},
    }


def test_ratios_and_targets() -> None:
    data = synthetic(ours_s=1.0, alone_s=0.8)
    report.annotate(data)
    ours = data["rows"][1]
    assert ours["vs_trl"]["tokens_per_s"] == pytest.approx(10.0)
    assert ours["vs_trl"]["tokens_per_s_quiet_steps"] == pytest.approx(10.0)
    assert ours["vs_trl"]["train_mb"] == pytest.approx(700 / 5000)
    assert ours["mfu"] == pytest.approx(0.40)
    assert data["alone"][0]["mfu"] == pytest.approx(0.50)
    verdicts = {t["target"]: t["met"] for t in data["targets"]}
    assert verdicts["ULMA vs TRL KTOTrainer: tokens/s >= 3.0x"] is True
    assert verdicts["memory ulma-lightning ulma fp32 vs TRL kto fp32: <= 0.6x"] is True
    mfu = [t for t in data["targets"] if "MFU" in t["target"]]
    assert [round(t["value"], 3) for t in mfu] == [0.5, 0.4]
    assert "timed alone" in mfu[0]["target"] and "interleaved" in mfu[1]["target"]
    # a missing row is a miss, not a pass
    assert verdicts["DPO vs TRL DPOTrainer: tokens/s >= 1.5x"] is False


def test_mfu_target_missed_when_slow() -> None:
    data = synthetic(ours_s=1.25, alone_s=1.1)
    report.annotate(data)
    assert [t["met"] for t in data["targets"] if "MFU" in t["target"]] == [False, False]


def test_markdown_reports_alone_row_and_policy() -> None:
    data = synthetic()
    data.update(
        workload=report.workload_description(),
        machine={
            "cpu": "test cpu",
            "cores": 2,
            "threads": 2,
            "python": "3",
            "torch": "t",
            "transformers": "x",
            "trl": "y",
        },
        wall_s=600.0,
        command="PYTHONPATH=. python -m benchmarks.bench_a",
    )
    for r in data["rows"] + data["alone"]:
        r["loadavg"] = (1.0, 1.0, 1.0)
    report.annotate(data)
    text = report.markdown(data)
    assert "in 10.0 minutes" in text
    assert "ulma-lightning ulma fp32 alone" in text and "MFU 50.0%" in text
    assert "left at OpenMP's default (unset) for every row" in text
    data["omp_wait_policy"] = {"ours": "default", "trl": "PASSIVE"}
    assert "`PASSIVE` for TRL's" in report.markdown(data)


def tuned(
    ours_default_s: float = 1.0, ours_jemalloc_s: float = 0.8, trl_default_s: float = 10.0, trl_jemalloc_s: float = 4.0
) -> dict[str, Any]:
    """Each row measured with both allocators (made-up numbers): TRL gains most from jemalloc."""
    rows = [
        result(Row("trl", "kto"), trl_default_s, 5000),
        result(Row("trl", "kto", allocator="jemalloc"), trl_jemalloc_s, 5200),
        result(Row("ours", "ulma"), ours_default_s, 700),
        result(Row("ours", "ulma", allocator="jemalloc"), ours_jemalloc_s, 760),
    ]
    return {
        "matmul_peak_flops": {"fp32": PEAK, "bf16": 2 * PEAK},
        "rows": rows,
        "alone": [],
        "scaling": [],
        "omp_wait_policy": {"ours": "default", "trl": "default"},
        "allocator": {"ours": ["default", "jemalloc"], "trl": ["default", "jemalloc"],
                      "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                      "malloc_conf": "dirty_decay_ms:-1,muzzy_decay_ms:-1", "notes": []},
    }  # fmt: skip


def test_headline_ratio_uses_the_tuned_peer_and_keeps_the_untuned() -> None:
    data = tuned()
    report.annotate(data)
    trl_default, trl_jemalloc, ours_default, ours_jemalloc = data["rows"]
    assert [r["fastest_setting"] for r in data["rows"]] == [False, True, False, True]
    # headline: against TRL at its fastest allocator (4 s/step), the untuned ratio beside it (10 s/step)
    assert ours_jemalloc["vs_trl"]["tokens_per_s"] == pytest.approx(4.0 / 0.8)
    assert ours_jemalloc["vs_trl"]["allocator"] == "jemalloc"
    assert ours_jemalloc["vs_trl_default"]["tokens_per_s"] == pytest.approx(10.0 / 0.8)
    assert ours_default["vs_trl"]["tokens_per_s"] == pytest.approx(4.0)
    assert ours_default["vs_trl"]["train_mb"] == pytest.approx(700 / 5200)
    target = next(t for t in data["targets"] if t["target"] == "ULMA vs TRL KTOTrainer: tokens/s >= 3.0x")
    assert target["value"] == pytest.approx(5.0) and target["met"] is True
    # memory target: the library's fastest row only, against the tuned peer
    memory = [t for t in data["targets"] if t["target"].startswith("memory")]
    assert [t["target"] for t in memory] == [
        "memory ulma-lightning ulma fp32 jemalloc vs TRL kto fp32 jemalloc: <= 0.6x"
    ]
    assert memory[0]["value"] == pytest.approx(760 / 5200)


def test_target_missed_against_the_tuned_peer_though_met_against_the_untuned() -> None:
    data = tuned(ours_default_s=1.5, ours_jemalloc_s=1.6, trl_default_s=10.0, trl_jemalloc_s=4.0)
    report.annotate(data)
    ours_default = data["rows"][2]
    assert ours_default["fastest_setting"] is True
    assert ours_default["vs_trl_default"]["tokens_per_s"] == pytest.approx(10 / 1.5)  # would pass 3x
    target = next(t for t in data["targets"] if t["target"] == "ULMA vs TRL KTOTrainer: tokens/s >= 3.0x")
    assert target["value"] == pytest.approx(4.0 / 1.5) and target["met"] is False


def test_markdown_names_each_rows_allocator_and_a_missing_jemalloc() -> None:
    data = tuned()
    data.update(
        workload=report.workload_description(),
        machine={
            "cpu": "test cpu",
            "cores": 2,
            "threads": 2,
            "python": "3",
            "torch": "t",
            "transformers": "x",
            "trl": "y",
        },
        wall_s=60.0,
        command="PYTHONPATH=. python -m benchmarks.bench_a",
    )
    for r in data["rows"]:
        r["loadavg"] = (1.0, 1.0, 1.0)
    report.annotate(data)
    text = report.markdown(data)
    assert "| TRL kto fp32 jemalloc | jemalloc * |" in text
    assert "| TRL kto fp32 | default |" in text
    assert "| ulma-lightning ulma fp32 jemalloc | jemalloc * | 1250 | 0.80 |" in text
    assert "5.00x (jemalloc)" in text and "12.50x |" in text
    assert "TRL kto fp32: jemalloc 2.50x as fast as default" in text
    assert "not found" not in text
    data["allocator"].update(
        ours=["default"],
        trl=["default"],
        notes=["jemalloc (libjemalloc.so.2) not found, so only the default allocator was measured: install it"],
    )
    assert "**jemalloc (libjemalloc.so.2) not found" in report.markdown(data)
