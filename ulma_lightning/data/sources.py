"""Reading raw records from files, local dataset folders, the hub, or the built-in demo task.

A *source* is a string:

* a local file: ``.jsonl``, ``.json``, ``.parquet``, ``.csv``, each optionally ``.gz``;
* a local folder saved with ``datasets.Dataset.save_to_disk`` (or any folder ``datasets.load_dataset``
  reads);
* a hub dataset: ``hf://OWNER/NAME?split=test&name=CONFIG&data_dir=DIR``;
* the demo task: ``demo://binary`` or ``demo://continuous`` (point-wise), ``demo://pairwise``
  (``{prompt, chosen, rejected}``) or ``demo://demonstration`` (``{prompt, response}``, the chosen
  side of the pairs), with ``?split=train|test&n=N&seed=S``;
* the comparison task (:mod:`ulma_lightning.data.task`): ``task://KIND?variant=ordinary|golden&split=
  train|val|test&n=N&seed=S[&stratified=true]`` with KIND ``binary``, ``continuous``, ``pairwise`` or
  ``demonstration`` (``stratified``: the same harmful share in every prefix, whatever the seed), and
  ``task://base?split=train|val&n=N&seed=S``, the base model's corpus of answers of every style.

Each record comes with its :class:`Location` (file and line, or row) so that errors can name it.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from ulma_lightning.choices import check_choices
from ulma_lightning.data.errors import DataError, Location  # Location: defined with the errors that name it

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DEMO_KINDS = ("binary", "continuous", "pairwise", "demonstration")
SAVE_AS_UTF8 = "save the file as UTF-8, e.g. with iconv -f latin1 -t utf-8"
TASK_KINDS = (*DEMO_KINDS, "base")  # base: the base model's broad corpus (demonstrations of every style)
TASK_QUERY = ("variant", "split", "n", "seed", "stratified")
TASK_SIZES = {"train": 2000, "val": 200, "test": 300}


#: the default of the data modules' ``max_record_chars``: characters per record (a JSONL line)
MAX_RECORD_CHARS = 1_000_000
TOO_LONG_HINT = (
    "raise data.init_args.max_record_chars (null: no limit), or set on_bad_record: skip to skip such records"
)


def too_long(location: Location, size: str, max_chars: int) -> DataError:
    """The error of a record over ``max_record_chars`` (``size``: how long it is, in words)."""
    return DataError(
        location, None, f"the record is {size}, over max_record_chars ({max_chars:,} characters)", TOO_LONG_HINT
    )


def text_size(value: Any) -> int:
    """The characters of text in a record: its strings (keys included), in nested lists and mappings."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + text_size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(text_size(v) for v in value)
    return 0


def _long_line(handle: Any, start: bytes) -> int:
    """Read the rest of a line that began with ``start`` without keeping it; its size in bytes."""
    size = len(start)
    while chunk := handle.readline(1 << 20):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return size


def _lines(path: Path, max_chars: int | None = None) -> Iterator[tuple[int, str | DataError]]:
    """The lines of a text file (``.gz`` or not), numbered from 1 and decoded as UTF-8; a leading
    byte-order mark is dropped (utf-8-sig).

    A line that is not UTF-8 comes as a :class:`DataError` naming it, in place of its text; so does a
    line longer than ``max_chars`` characters, read in bounded pieces (at most ``4 * max_chars``
    bytes are held): one huge line cannot fill the memory. A truncated or corrupt ``.gz`` ends with
    a :class:`DataError` naming the last complete line (a skippable bad record in ``.jsonl``:
    ``on_bad_record: skip`` keeps the lines before it).
    """
    compressed = path.suffix == ".gz"
    number = 0
    limit = -1 if max_chars is None else 4 * max_chars + 3  # UTF-8: at most 4 bytes a character; a BOM, \r\n
    with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
        try:
            while raw := handle.readline(limit):
                number += 1
                if max_chars is not None and len(raw) == limit and not raw.endswith(b"\n"):
                    size = _long_line(handle, raw)
                    yield number, too_long(Location(str(path), line=number), f"a line of {size:,} bytes", max_chars)
                    continue
                if number == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    text = raw.decode("utf-8")
                    if max_chars is not None and len(text.rstrip("\r\n")) > max_chars:
                        yield (
                            number,
                            too_long(
                                Location(str(path), line=number),
                                f"a line of {len(text.rstrip()):,} characters",
                                max_chars,
                            ),
                        )
                        continue
                    yield number, text
                except UnicodeDecodeError as exc:
                    column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
                    problem = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})"
                    hint = SAVE_AS_UTF8 + ", or set on_bad_record: skip to skip such lines"
                    yield number, DataError(Location(str(path), line=number), None, problem, hint)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            if isinstance(exc, gzip.BadGzipFile) and number == 0:
                problem, hint = f"not gzip data ({exc})", "compress it with gzip, or drop the .gz suffix"
                raise DataError(Location(str(path)), None, problem, hint) from None
            last = f"line {number} is the last complete one" if number else "no complete line was read"
            problem = f"the compressed data is truncated or corrupt ({exc}); {last}"
            hint = (
                "download or compress the file again; with on_bad_record: skip a .jsonl file keeps the lines before it"
            )
            yield number + 1, DataError(Location(str(path)), None, problem, hint)  # ends the file


def _text_lines(path: Path) -> Iterator[str]:
    """The decoded lines of a file; a line that is not UTF-8 stops the read (records may span lines)."""
    for _, line in _lines(path):
        if isinstance(line, DataError):
            if line.location.line is None:  # the file as a whole (a truncated .gz)
                raise line
            raise DataError(line.location, None, line.problem, SAVE_AS_UTF8)
        yield line


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _read_jsonl(path: Path, max_chars: int | None = None) -> Iterator[tuple[Any, Location]]:
    for number, line in _lines(path, max_chars):
        where = Location(str(path), line=number)
        if isinstance(line, DataError):
            yield line, where
            continue
        if not line.strip():
            continue
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as exc:
            yield DataError(where, None, f"malformed JSON ({exc.msg} at column {exc.colno})"), where


def _read_json(path: Path) -> Iterator[tuple[Any, Location]]:
    text = "".join(_text_lines(path))
    if not text.strip():
        return  # an empty file: no records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(Location(str(path), line=exc.lineno), None, f"malformed JSON ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                Location(str(path)), None, "a .json file must hold a list of records or an object with one list"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(Location(str(path)), None, "a .json file must hold a list of records")
    for row, record in enumerate(data):
        yield record, Location(str(path), row=row)


def _read_csv(path: Path) -> Iterator[tuple[Any, Location]]:
    reader = csv.DictReader(_text_lines(path))
    for record in reader:
        yield dict(record), Location(str(path), line=reader.line_num)


def _read_parquet(path: Path) -> Iterator[tuple[Any, Location]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row, record in enumerate(table.to_pylist()):
        yield record, Location(str(path), row=row)


def _read_dataset(dataset: Any, name: str) -> Iterator[tuple[Any, Location]]:
    for row, record in enumerate(dataset):
        yield record, Location(name, row=row)


def _read_folder(path: Path, split: str) -> Iterator[tuple[Any, Location]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        loaded = datasets.load_dataset(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(Location(str(path)), None, f"no split {split!r}; the folder has {sorted(loaded)}")
        loaded = loaded[split]
    yield from _read_dataset(loaded, str(path))


def _read_hub(source: str, default_split: str) -> Iterator[tuple[Any, Location]]:
    import datasets

    parsed = urlparse(source)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    repo = (parsed.netloc + parsed.path).strip("/")
    split = query.pop("split", default_split)
    name = query.pop("name", None)
    dataset = datasets.load_dataset(repo, name, split=split, **query)
    yield from _read_dataset(dataset, source)


def _read_demo(source: str, default_split: str) -> Iterator[tuple[Any, Location]]:
    from ulma_lightning.data.demo import generate_demonstrations, generate_pairs, generate_records

    parsed = urlparse(source)
    label = parsed.netloc or parsed.path.strip("/")
    if label not in DEMO_KINDS:
        raise ValueError(
            "demo source must be demo://binary or demo://continuous (point-wise), demo://pairwise or "
            f"demo://demonstration, got {source!r}"
        )
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    split = query.get("split", default_split)
    n = int(query.get("n", 2000 if split == "train" else 400))
    seed = int(query.get("seed", {"train": 0, "validation": 1, "val": 1, "test": 2}.get(split, 3)))
    if label == "pairwise":
        records = generate_pairs(n, seed=seed)
    elif label == "demonstration":
        records = generate_demonstrations(n, seed=seed)
    else:
        records = generate_records(n, seed=seed, label=label)  # type: ignore[arg-type]
    for row, record in enumerate(records):
        yield record, Location(source, row=row)


def _task_query(source: str, default_split: str) -> tuple[str, dict[str, Any]]:
    """The kind and the generator arguments of a ``task://`` source; ValueError naming the bad part."""
    from ulma_lightning.data.task import SPLITS, VARIANTS

    parsed = urlparse(source)
    kind = parsed.netloc or parsed.path.strip("/")
    if kind not in TASK_KINDS:
        raise ValueError(
            f"{source!r}: unknown task kind {kind!r}; write task://KIND with KIND one of {', '.join(TASK_KINDS)}"
        )
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = sorted(set(query) - set(TASK_QUERY))
    if unknown:
        raise ValueError(f"{source!r}: unknown option(s) {', '.join(unknown)}; task:// takes {', '.join(TASK_QUERY)}")
    split = query.get("split", "val" if default_split == "validation" else default_split)
    variant = query.get("variant", "ordinary")
    check_choices(repr(source), split=(split, SPLITS), variant=(variant, VARIANTS))
    try:
        n, seed = int(query.get("n", TASK_SIZES[split])), int(query.get("seed", 0))
    except ValueError:
        raise ValueError(f"{source!r}: n and seed must be integers") from None
    if n < 1:
        raise ValueError(f"{source!r}: n must be at least 1, got {n}")
    stratified = query.get("stratified", "false").lower()
    check_choices(repr(source), stratified=(stratified, ("true", "false", "1", "0")))
    if kind == "base":
        if split == "test" or "variant" in query or "stratified" in query:
            raise ValueError(
                f"{source!r}: task://base (the base model's corpus) takes split train or val, n and seed only"
            )
        return kind, {"n": n, "split": split, "seed": seed}
    return kind, {"n": n, "split": split, "variant": variant, "seed": seed, "stratified": stratified in ("true", "1")}


def _read_task(source: str, default_split: str) -> Iterator[tuple[Any, Location]]:
    """Records of the comparison task. Point-wise kinds give two records per prompt (chosen, then
    rejected) under one location, so that ``val_fraction`` keeps them together."""
    from ulma_lightning.data.task import generate_base_corpus, generate_pairs, score_response

    kind, options = _task_query(source, default_split)
    if kind == "base":
        for row, record in enumerate(generate_base_corpus(**options)):
            yield record, Location(source, row=row)
        return
    for row, pair in enumerate(generate_pairs(**options)):
        where = Location(source, row=row)
        prompt = pair["prompt"]
        if kind == "pairwise":
            yield pair, where
        elif kind == "demonstration":
            yield {"prompt": prompt, "response": pair["chosen"]}, where
        else:
            for side, label in (("chosen", 1.0), ("rejected", 0.0)):
                score = label if kind == "binary" else score_response(prompt, pair[side])
                yield {"prompt": prompt, "response": pair[side], "score": score}, where


def read_source(
    source: str, split: str = "train", max_record_chars: int | None = None
) -> Iterator[tuple[Any, Location]]:
    """Yield ``(record, location)`` pairs; a malformed JSON line yields a :class:`DataError` as record,
    and so does a ``.jsonl`` line longer than ``max_record_chars`` characters (never read whole)."""
    if source.startswith("demo://"):
        yield from _read_demo(source, split)
        return
    if source.startswith("task://"):
        yield from _read_task(source, split)
        return
    if source.startswith("hf://"):
        yield from _read_hub(source, split)
        return
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        yield from _read_folder(path, split)
        return
    if not path.exists():
        raise FileNotFoundError(
            f"data source {source!r} is not a file or folder here; for a hub dataset write hf://OWNER/NAME"
        )
    suffix = _base_suffix(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise ValueError(
            f"{source}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)} (optionally .gz)"
        )
    if suffix == ".parquet" and path.suffix == ".gz":
        raise ValueError(f"{source}: gzip-compressed parquet is not supported; parquet compresses itself")
    if suffix == ".jsonl":
        yield from _read_jsonl(path, max_record_chars)
        return
    yield from readers[suffix](path)
