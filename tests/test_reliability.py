"""Issue 15 (Reliability II): a run writes where the user says, bad options and records are refused
early with their place named, nothing is overwritten or skipped silently."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_export_methods import fit_one_step

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


# ----------------------------------------------------------------------------- a trained checkpoint
@pytest.fixture(scope="module")
def dpo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of ``ulma fit --config configs/dpo.yaml`` run for one step on a tiny model."""
    root = tmp_path_factory.mktemp("dpo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ulma"])
        fit_one_step("dpo", root)
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


# ----------------------------------------------------------------------------- 4, 12: export
def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path, dpo_checkpoint: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"--out .*mine is a folder that is not empty.*--overwrite"):
        main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(out)])
    assert (out / "config.json").read_text() == "my own config"
    main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(out), "--overwrite"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not (out / "notes.txt").exists()  # replaced whole, not mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder left


def test_a_failed_export_leaves_no_partial_folder_and_names_the_path(
    tmp_path: Path, dpo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ulma_lightning.modules.base import AlignmentModule

    def disk_full(self, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AlignmentModule, "export_hf", disk_full)
    with pytest.raises(OSError, match=r"no space left on the device to export to .*hf_out"):
        main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(tmp_path / "hf_out")])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_checkpoint_save_removes_its_partial(tmp_path: Path) -> None:
    from ulma_lightning.checkpointing import atomic_save

    def disk_full(path: str) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(disk_full, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import TrainerFn

    from ulma_lightning.checkpointing import AtomicModelCheckpoint
    from ulma_lightning.loggers import TensorBoardLogger

    callback = AtomicModelCheckpoint(save_last=True)
    trainer = Trainer(logger=TensorBoardLogger(str(tmp_path), name="ulma"), callbacks=[callback], accelerator="cpu")
    with pytest.warns(UserWarning, match=rf"no last\*\.ckpt in {tmp_path}/ulma/\*/checkpoints, so this run starts from the initial"):
        assert trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True, model_connected=True) is None


# ----------------------------------------------------------------------------- 5: another method's checkpoint
@pytest.mark.parametrize("how", ["path", "last"])
def test_resuming_from_another_methods_checkpoint_says_what_does_not_match(tmp_path: Path, dpo_checkpoint: Path, how: str) -> None:
    args = ["fit", "--config", ULMA, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    if how == "path":
        args += ["--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(dpo_checkpoint)]
    else:  # the DPO run's folder: runs/dpo/version_0/checkpoints/last.ckpt
        args += ["--trainer.default_root_dir", str(dpo_checkpoint.parents[3]), "--trainer.logger.init_args.name", "dpo", "--ckpt_path", "last"]
    with pytest.raises(ValueError, match=r"written by another run's module DPOModule \(this run: ULMAModule\) and data module PairwiseDataModule \(this run: PointwiseDataModule\)"):
        main(args)


# ----------------------------------------------------------------------------- 10: numeric options
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--data.init_args.batch_size", "0", "PointwiseDataModule: batch_size must be >= 1, got 0"),
        ("--data.init_args.max_length", "-4", "PointwiseDataModule: max_length must be >= 1, got -4"),
        ("--model.init_args.beta", "0", "ULMAModule: beta must be > 0, got 0.0"),
        ("--model.init_args.optimizer.lr", "-1", "OptimizerConfig: lr must be >= 0, got -1.0"),
    ],
)
def test_a_bad_numeric_option_stops_with_its_name_at_the_end(tmp_path: Path, option: str, value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        main(["fit", "--config", ULMA, *QUIET, "--trainer.default_root_dir", str(tmp_path), option, value])
    assert str(info.value).startswith(message), str(info.value)
    assert "Namespace(" not in str(info.value)  # no dump of the config before (or instead of) the message


# ----------------------------------------------------------------------------- 6: truncation
def test_truncation_is_counted_per_split_and_a_severe_cut_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = "Tell me, in as much detail as you can and step by step, how I should make a good cup of tea?"
    records = [{"prompt": long_prompt, "response": "Boil water. " * 50, "score": i % 2} for i in range(4)]
    train = write_jsonl(tmp_path / "long.jsonl", records)
    datamodule = PointwiseDataModule(train=str(train), max_length=8)
    with caplog.at_level("INFO", logger="ulma_lightning.data"):
        datamodule.setup("fit")
    report = datamodule.truncated["train"]
    assert (report.samples, report.prompts_cut, report.prompts_halved, report.responses_cut) == (4, 4, 4, 4)
    assert report.prompt_tokens_cut > 4 * 10 and report.response_tokens_cut > 4 * 50
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("train split: truncation to max_length cut 4 of 4 prompts" in w and "most prompts lost more than half" in w for w in warnings), warnings
    roomy = PointwiseDataModule(train=str(train), max_length=512)
    roomy.setup("fit")
    assert roomy.truncated["train"].prompts_cut == roomy.truncated["train"].responses_cut == 0


# ----------------------------------------------------------------------------- 11: duplicates
def test_duplicates_never_sit_on_both_sides_of_the_held_out_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    unique = [{"prompt": f"How do I make tea, take {i}?", "response": f"Boil water {i} times.", "score": i % 2} for i in range(12)]
    records = unique + [dict(r, score=1 - r["score"]) for r in unique[:6]] + unique[:6]  # 12 repeats, some relabelled
    train = write_jsonl(tmp_path / "dup.jsonl", records)
    datamodule = PointwiseDataModule(train=str(train), val_fraction=0.3, max_length=64)
    with caplog.at_level("INFO", logger="ulma_lightning.data"):
        datamodule.setup("fit")
    texts = {split: {(e.prompt, e.response) for e in datamodule.examples[split]} for split in ("train", "val")}
    assert texts["train"] and texts["val"] and not texts["train"] & texts["val"]
    assert len(datamodule.examples["train"]) + len(datamodule.examples["val"]) == 24
    assert datamodule.duplicates == 12
    assert any("12 record(s) repeat an earlier record's text" in r.getMessage() for r in caplog.records)
