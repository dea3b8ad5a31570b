"""Reading records: every file format (plain and .gz), dataset folders, column mapping, demo://."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from ulma_lightning import DataError, PointwiseDataModule
from ulma_lightning.data.errors import SkipReport
from ulma_lightning.data.sources import read_source

RECORDS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour and water, then bake it.", "score": 1.0},
    {"prompt": "How do I steal a car?", "response": "Break the window and drive away.", "score": 0.0},
    {"prompt": "How do I make tea?", "response": "Boil water and pour it over the leaves.", "score": 1.0},
]


def write_csv(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


WRITERS = {
    "data.jsonl": write_jsonl,
    "data.jsonl.gz": write_jsonl,
    "data.json": write_json,
    "data.parquet": write_parquet,
    "data.csv": write_csv,
    "data.csv.gz": write_csv,
}


def examples_of(source: str, split: str = "train", **kwargs) -> list:
    """Validated examples of ``source`` (no tokenization)."""
    dm = PointwiseDataModule(train=source, **kwargs)
    return dm.read_examples(source, split, SkipReport(split))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_file_format_reads_the_same_examples(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, RECORDS)
    examples = examples_of(str(path))
    assert [(e.prompt, e.response, e.score) for e in examples] == [
        (r["prompt"], r["response"], r["score"]) for r in RECORDS
    ]
    # every record knows where it came from: file:line for text files, the record number otherwise
    first = str(examples[0].location)
    assert first.startswith(str(path))
    if name.startswith("data.jsonl"):
        assert first.endswith(":1")
    elif name.startswith("data.csv"):
        assert first.endswith(":2")  # line 1 is the header


def test_pointwise_datamodule_builds_batches_from_a_gz_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl.gz", RECORDS)
    dm = PointwiseDataModule(train=str(path), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "score", "index"}
    assert batch["input_ids"].shape[0] == 2
    assert sorted(dm.datasets["train"].items[i]["score"] for i in range(3)) == [0.0, 1.0, 1.0]


def test_saved_dataset_folder(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(folder))
    examples = examples_of(str(folder))
    assert [e.response for e in examples] == [r["response"] for r in RECORDS]
    assert str(examples[1].location) == f"{folder} (record 1)"


def test_dataset_dict_folder_picks_each_split(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS),
            "validation": datasets.Dataset.from_list(RECORDS[:1]),
            "test": datasets.Dataset.from_list(RECORDS[1:]),
        }
    ).save_to_disk(str(folder))
    dm = PointwiseDataModule(train=str(folder), val=str(folder), test=str(folder), batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    assert {split: len(ds) for split, ds in dm.datasets.items()} == {"train": 3, "val": 1, "test": 2}
    # a missing split is named, with the splits that exist
    with pytest.raises(DataError, match=r"no split 'predict'.*\['test', 'train', 'validation'\]"):
        list(read_source(str(folder), "predict"))


def test_column_mapping_renames_the_users_columns(tmp_path: Path) -> None:
    renamed = [{"question": r["prompt"], "completion": r["response"], "label": r["score"]} for r in RECORDS]
    path = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    examples = examples_of(str(path), columns={"prompt": "question", "response": "completion", "score": "label"})
    assert [(e.prompt, e.response, e.score) for e in examples] == [
        (r["prompt"], r["response"], r["score"]) for r in RECORDS
    ]
    # without the mapping the same file is a bad record that names the missing field
    with pytest.raises(DataError, match=r"renamed\.jsonl:1: field 'prompt': missing"):
        examples_of(str(path))


def test_unknown_sources_fail_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hf://OWNER/NAME"):
        list(read_source(str(tmp_path / "nope.jsonl")))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        list(read_source(str(tmp_path / "data.txt")))
    with pytest.raises(ValueError, match="demo://binary or demo://continuous"):
        list(read_source("demo://ternary"))


def test_demo_source_honours_n_split_and_seed() -> None:
    train = [r for r, _ in read_source("demo://binary?n=12")]
    again = [r for r, _ in read_source("demo://binary?n=12&seed=0")]
    test = [r for r, _ in read_source("demo://binary?n=12", "test")]
    assert len(train) == 12 and train == again
    assert test != train  # each split has its own default seed
    continuous = [r["score"] for r, _ in read_source("demo://continuous?n=200")]
    assert any(0.0 < s < 1.0 for s in continuous)
