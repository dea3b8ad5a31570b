"""Issue 15 (Reliability II): a run writes where the user says, bad options and records are refused
early with their place named, nothing is overwritten or skipped silently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ulma_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
ULMA = str(REPO / "configs" / "ulma.yaml")
QUIET = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.num_sanity_val_steps", "0", "--data.init_args.train", "demo://binary?n=24",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])


def test_default_root_dir_decides_where_a_shipped_config_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", ULMA, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", "elsewhere/run1"])  # fmt: skip
    run = tmp_path / "elsewhere" / "run1" / "ulma" / "version_0"
    for written in ("checkpoints/last.ckpt", "hf_model/config.json", "config.yaml"):
        assert (run / written).exists(), written
    assert list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # nothing in ./runs
