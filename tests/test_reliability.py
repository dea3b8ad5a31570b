"""Issue 15 (Reliability II): a run writes where the user says, bad options and records are refused
early with their place named, nothing is overwritten or skipped silently."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ulma_lightning import DataError, PointwiseDataModule
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


# ----------------------------------------------------------------------------- 3: binary scores
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scored(*scores: float) -> list[dict]:
    return [{"prompt": f"How do I make tea, take {i}?", "response": "Boil water, pour it on the leaves.", "score": s} for i, s in enumerate(scores)]


def test_a_score_that_is_not_0_or_1_under_binary_labels_names_file_line_and_field(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "feedback.jsonl", scored(1, 0, 1, 0.5, 0))
    args = ["fit", "--config", ULMA, *QUIET, "--data.init_args.train", str(train), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(DataError, match=rf"feedback\.jsonl:4: field 'score': 0\.5 is neither 0 nor 1.*label_type: continuous"):
        main(args)


def _with_module(datamodule: PointwiseDataModule, label_type: str) -> PointwiseDataModule:
    datamodule.trainer = SimpleNamespace(lightning_module=SimpleNamespace(label_type=label_type))  # type: ignore[assignment]
    return datamodule


def test_on_bad_record_skip_counts_non_binary_scores_and_continuous_labels_keep_them(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "feedback.jsonl", scored(1, 0.5, 0, 0.25, 1))
    binary = _with_module(PointwiseDataModule(train=str(train), on_bad_record="skip", max_length=64), "binary")
    binary.setup("fit")
    assert sorted(item["score"] for item in binary.datasets["train"].items) == [0.0, 1.0, 1.0]
    assert binary.skipped["train"].total == 2
    continuous = _with_module(PointwiseDataModule(train=str(train), max_length=64), "continuous")
    continuous.setup("fit")
    assert len(continuous.datasets["train"]) == 5
