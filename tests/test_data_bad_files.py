"""Bad input files, driven as a user drives them (``ulma fit --data.init_args.train FILE``): a file
that is not UTF-8, an empty file, a truncated ``.gz``; and a UTF-8 byte-order mark, which is fine."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from ulma_lightning import DataError, PointwiseDataModule
from ulma_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
RECORDS = [
    {"prompt": f"How do I make tea, take {i}?", "response": "Boil water and pour it over the leaves.", "score": i % 2}
    for i in range(3)
]
BAD = {"prompt": "Un caf\u00e9?", "response": "Oui.", "score": 1}


def encode(fmt: str, records: list[dict]) -> bytes:
    """``records`` as the UTF-8 bytes of a .jsonl, .csv or .json file."""
    if fmt == "json":
        return json.dumps(records, indent=1, ensure_ascii=False).encode()
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["prompt", "response", "score"])
        writer.writerows([r["prompt"], r["response"], r["score"]] for r in records)
        return text.getvalue().encode()
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def latin1(data: bytes) -> tuple[bytes, int, int]:
    """``data`` with its "\u00e9" in Latin-1 (byte 0xe9), and that byte's 1-based line and column."""
    data = data.replace("\u00e9".encode(), b"\xe9")
    before = data[: data.index(b"\xe9")]
    return data, before.count(b"\n") + 1, len(before.rsplit(b"\n", 1)[-1]) + 1


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fit_overrides(root: Path, train: Path) -> list[str]:
    return [
        "fit", "--config", str(REPO / "configs" / "ulma.yaml"), "--data.init_args.train", str(train),
        "--trainer.max_steps", "1", "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
    ]  # fmt: skip


@pytest.fixture
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])


FORMATS = ["jsonl", "jsonl.gz", "csv", "json"]


@pytest.mark.integration
@pytest.mark.usefixtures("_plain_argv")
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path, fmt: str) -> None:
    data, line, column = latin1(encode(fmt.removesuffix(".gz"), RECORDS[:2] + [BAD] + RECORDS[2:]))
    path = write(tmp_path / f"latin1.{fmt}", data)
    with pytest.raises(DataError) as info:
        main(fit_overrides(tmp_path, path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: not UTF-8 text (byte 0xe9 at column {column})"), message
    assert "save the file as UTF-8" in message


@pytest.mark.integration
@pytest.mark.usefixtures("_plain_argv")
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_train_file_names_the_file_and_the_train_split(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"empty.{fmt}", b"")
    with pytest.raises(DataError) as info:  # configs/ulma.yaml holds out val_fraction: 0.1 of train
        main(fit_overrides(tmp_path, path))
    assert str(info.value).startswith(f"{path}: the train split has no usable samples: it holds no records"), str(
        info.value
    )


@pytest.mark.integration
def test_the_ulma_command_reports_an_empty_train_file(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.jsonl", b"")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", *fit_overrides(tmp_path, path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ulma_lightning.data.errors.DataError: {path}: the train split has no usable samples"), (
        result.stderr[-2000:]
    )


def test_a_split_whose_records_are_all_held_out_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "one.jsonl", encode("jsonl", RECORDS[:1]))
    with pytest.raises(
        DataError, match=rf"^{path}: the train split has no usable samples: val_fraction=0.5 holds out all 1"
    ):
        PointwiseDataModule(train=str(path), val_fraction=0.5).setup("fit")


def test_a_line_that_is_not_utf8_can_be_skipped(tmp_path: Path) -> None:
    data, line, column = latin1(encode("jsonl", RECORDS[:2] + [BAD] + RECORDS[2:]))
    path = write(tmp_path / "latin1.jsonl", data)
    dm = PointwiseDataModule(train=str(path), on_bad_record="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(RECORDS)
    assert dm.skipped["train"].examples == {f"not UTF-8 text (byte 0xe9 at column {column})": f"{path}:{line}"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_byte_order_mark_is_read_as_utf8_sig(tmp_path: Path, fmt: str) -> None:
    plain = write(tmp_path / f"plain.{fmt}", encode(fmt.removesuffix(".gz"), RECORDS))
    marked = write(tmp_path / f"marked.{fmt}", b"\xef\xbb\xbf" + encode(fmt.removesuffix(".gz"), RECORDS))
    read = []
    for path in (plain, marked):
        dm = PointwiseDataModule(train=str(path))
        dm.setup("fit")
        read.append([(e.prompt, e.response, e.score) for e in dm.examples["train"]])
    assert read[0] == read[1] and len(read[0]) == len(RECORDS)


def test_a_truncated_gz_names_the_file_and_the_last_good_line(tmp_path: Path) -> None:
    records = [
        {**RECORDS[0], "prompt": f"question {i} of many, all different: {i * 7919 % 10007}"} for i in range(3000)
    ]
    whole = gzip.compress(encode("jsonl", records))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    complete = zlib.decompressobj(wbits=31).decompress(path.read_bytes()).count(b"\n")  # lines the cut file still holds
    assert 0 < complete < len(records)
    with pytest.raises(DataError) as info:
        PointwiseDataModule(train=str(path)).setup("fit")
    message = str(info.value)
    assert message.startswith(f"{path}: the compressed data is truncated or corrupt"), message
    assert f"line {complete} is the last complete one" in message
    # under skip, the complete lines are kept and the cut is a counted, logged skip
    skipping = PointwiseDataModule(train=str(path), on_bad_record="skip")
    skipping.setup("fit")
    assert len(skipping.examples["train"]) == complete
    assert list(skipping.skipped["train"].counts.values()) == [1]
    assert f"line {complete} is the last complete one" in next(iter(skipping.skipped["train"].counts))


# issue 26, item 7: one 200 MB line got the process killed for memory (the line was parsed and tokenized whole)
def test_a_record_over_max_record_chars_names_file_and_line_and_can_be_allowed(tmp_path: Path) -> None:
    huge = {"prompt": "Tell me everything.", "response": "tea " * 300_000, "score": 1}
    path = tmp_path / "huge.jsonl"
    path.write_bytes(encode("jsonl", [RECORDS[0], huge, RECORDS[1]]))
    with pytest.raises(DataError) as info:
        PointwiseDataModule(train=str(path)).setup("fit")  # the default limit: 1,000,000 characters
    message = str(info.value)
    assert (
        message.startswith(f"{path}:2: the record is a line of 1,200,0")
        and "over max_record_chars (1,000,000 characters)" in message
    )
    assert "raise data.init_args.max_record_chars (null: no limit)" in message
    skipping = PointwiseDataModule(train=str(path), on_bad_record="skip")
    skipping.setup("fit")
    assert len(skipping.examples["train"]) == 2 and skipping.skipped["train"].total == 1
    allowed = PointwiseDataModule(train=str(path), max_record_chars=2_000_000, max_length=32)
    allowed.setup("fit")
    assert len(allowed.examples["train"]) == 3


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_the_limit_holds_for_records_of_other_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"long.{fmt}"
    path.write_bytes(encode(fmt, [RECORDS[0], {**RECORDS[1], "response": "x" * 5_000}]))
    with pytest.raises(DataError, match=r"over max_record_chars \(1,000 characters\)"):
        PointwiseDataModule(train=str(path), max_record_chars=1_000).setup("fit")


def test_a_huge_jsonl_line_is_never_held_whole(tmp_path: Path) -> None:
    import tracemalloc

    from ulma_lightning.data.sources import read_source

    path = tmp_path / "huge.jsonl"
    with open(path, "w") as handle:
        handle.write(json.dumps(RECORDS[0]) + "\n")
        handle.write('{"prompt": "p", "response": "' + "tea " * 10_000_000 + '", "score": 1}\n')  # a 40 MB line
        handle.write(json.dumps(RECORDS[1]) + "\n")
    tracemalloc.start()
    try:
        records = list(read_source(str(path), max_record_chars=100_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [isinstance(r, DataError) for r, _ in records] == [False, True, False]
    assert str(records[1][0]).startswith(f"{path}:2: the record is a line of 40,000,0")
    assert peak < 8_000_000, f"reading held {peak:,} bytes"


# issue 26, item 14: a DataError arrived after a 40-line traceback
@pytest.mark.integration
@pytest.mark.parametrize("debug", [False, True])
def test_the_ulma_command_prints_a_bad_record_as_one_line_unless_debugging(tmp_path: Path, debug: bool) -> None:
    path = write(tmp_path / "bad.jsonl", encode("jsonl", RECORDS[:1]) + b'{"prompt": "no response here", "score": 1}\n')
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
        "HF_HUB_OFFLINE": "1",
        "ULMA_DEBUG": "1" if debug else "",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", *fit_overrides(tmp_path, path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ulma_lightning.data.errors.DataError: {path}:2: field 'response': missing"), result.stderr[
        -2000:
    ]
    if debug:
        assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-2] == "ulma: stopped (ULMA_DEBUG=1 shows the traceback):"


def test_the_ulma_command_prints_a_refused_option_as_one_line(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
        "HF_HUB_OFFLINE": "1",
    }
    args = [
        "fit",
        "--config",
        str(REPO / "configs" / "ulma.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--model.init_args.beta",
        "-1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "ulma_lightning.lightning_cli.ConfigError: ULMAModule: beta must be > 0, got -1.0 "
            "(option model.init_args.beta;"
        )
    )
