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


def result(row: Row, s_per_step: float, train_mb: float, flops_per_step: float = 40e9, tokens_per_step: float = 1000.0) -> dict[str, Any]:
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
        machine={"cpu": "test cpu", "cores": 2, "threads": 2, "python": "3", "torch": "t", "transformers": "x", "trl": "y"},
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
