"""Checks of records and of the held-out split: a score that is neither 0 nor 1 under binary labels
(an error naming file, line and field, or counted by ``on_bad_record: skip``), whole records held out
together, duplicates never on both sides of the split, truncation counted per split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUIET_FIT as QUIET
from conftest import ULMA_CONFIG as ULMA
from helpers import write_jsonl

from ulma_lightning import DataError, PointwiseDataModule
from ulma_lightning.cli import main

pytestmark = pytest.mark.usefixtures("plain_argv")


def test_val_fraction_holds_out_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as handle:
        for i in range(40):
            record = {"prompt": f"Question number {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            handle.write(json.dumps(record) + "\n")
    data = PointwiseDataModule(train=str(path), val_fraction=0.3, tokenizer="builtin:demo", max_length=64)
    data.setup("fit")
    prompts = {}
    for split in ("train", "val"):
        examples = data.datasets[split].items
        assert len(examples) % 2 == 0  # both samples of each pair
        prompts[split] = {tuple(item["input_ids"][item["labels"] == -100].tolist()) for item in examples}
    assert not prompts["train"] & prompts["val"]
    assert len(prompts["val"]) == 12 and len(prompts["train"]) == 28


# ----------------------------------------------------------------------------- 3: binary scores
def scored(*scores: float) -> list[dict]:
    return [
        {"prompt": f"How do I make tea, take {i}?", "response": "Boil water, pour it on the leaves.", "score": s}
        for i, s in enumerate(scores)
    ]


@pytest.mark.integration
def test_a_score_that_is_not_0_or_1_under_binary_labels_names_file_line_and_field(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "feedback.jsonl", scored(1, 0, 1, 0.5, 0))
    args = ["fit", "--config", ULMA, *QUIET, "--data.init_args.train", str(train), "--trainer.max_steps", "1",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(
        DataError, match=r"feedback\.jsonl:4: field 'score': 0\.5 is neither 0 nor 1.*label_type: continuous"
    ):
        main(args)


def test_on_bad_record_skip_counts_non_binary_scores_and_continuous_labels_keep_them(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "feedback.jsonl", scored(1, 0.5, 0, 0.25, 1))
    binary = PointwiseDataModule(train=str(train), on_bad_record="skip", max_length=64, label_type="binary")
    binary.setup("fit")
    assert sorted(item["score"] for item in binary.datasets["train"].items) == [0.0, 1.0, 1.0]
    assert binary.skipped["train"].total == 2
    continuous = PointwiseDataModule(train=str(train), max_length=64, label_type="continuous")
    continuous.setup("fit")
    assert len(continuous.datasets["train"]) == 5


# ----------------------------------------------------------------------------- 6: truncation
def test_truncation_is_counted_per_split_and_a_severe_cut_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
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
    assert any(
        "train split: truncation to max_length cut 4 of 4 prompts" in w and "most prompts lost more than half" in w
        for w in warnings
    ), warnings
    roomy = PointwiseDataModule(train=str(train), max_length=512)
    roomy.setup("fit")
    assert roomy.truncated["train"].prompts_cut == roomy.truncated["train"].responses_cut == 0


# ----------------------------------------------------------------------------- 11: duplicates
def test_duplicates_never_sit_on_both_sides_of_the_held_out_split(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unique = [
        {"prompt": f"How do I make tea, take {i}?", "response": f"Boil water {i} times.", "score": i % 2}
        for i in range(12)
    ]
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
