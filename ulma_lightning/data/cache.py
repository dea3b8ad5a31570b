"""A folder of tokenized features (``cache_dir``), shared by runs that read the same data the same way.

A data module with ``cache_dir`` set saves what setting a split up costs, once per distinct input:

* ``records-KEY.pt``: the examples read from a split's sources, its skip counts and log lines;
* ``features-KEY.pt``: the tokenized features built from those examples, the truncation counts and
  the skips of that step.

``KEY`` is a hash of everything that can change the content (:func:`digest`): the data module's
class and options, the split, each source (a file or folder by the SHA-256 of its bytes; ``demo://``,
``task://`` and ``hf://`` by the whole string, query included: pin a hub dataset with
``?revision=...``), the tokenizer (its vocabulary, merges, normaliser and special tokens, not just
its name), truncation, the library's version and the source of its data code. A changed input gives
a new key, so a stale entry is never read; old entries are left in the folder (delete it at will).

Files are written to a temporary name and renamed (:func:`os.replace`), so two processes building the
same entry at once (``ulma compare --jobs 2``, or the ranks of a DDP run, which each build the same
deterministic thing) leave one whole file. Each file starts with a magic line and the SHA-256 of the
rest, a ``torch.save`` of tensors, lists and strings loaded with ``weights_only=True`` (no pickle of
arbitrary objects); a file that fails any check is rebuilt, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("ulma_lightning.data")

FORMAT = 1
MAGIC = b"ulma-lightning feature cache 1\n"
#: the files whose source is part of every key (with the version): the code that reads and tokenizes
CODE_FILES = ("data", "tokenizers.py", "logprobs.py", "__init__.py")


class CacheMiss(Exception):
    """A value the cache cannot store (the entry is then not written)."""


# ----------------------------------------------------------------------------- keys
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """A file's SHA-256, computed once per state of the file in a process (any write, or a reset
    mtime, changes its ctime)."""
    return _sha256_file(Path(path))


def file_identity(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def source_identity(source: str) -> Any:
    """What a source's records depend on: a local file or folder by its content (each file's SHA-256),
    anything else (``demo://``, ``task://``, ``hf://``) by the string, its query included."""
    if "://" in source:
        return source
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return {"file": str(path.resolve()), "sha256": file_identity(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"folder": str(path.resolve()), "files": [[str(p.relative_to(path)), file_identity(p)] for p in files]}
    return {"missing": source}


def tokenizer_identity(tokenizer: Any, name: str) -> dict[str, Any]:
    """What a tokenizer's ids depend on: its name, class, vocabulary and model (the fast tokenizer's whole
    JSON: merges, normaliser, pre-tokenizer, post-processor), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        model = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    files: list[Any] = []
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if folder.is_dir():  # a local tokenizer folder: every file (a slow tokenizer's model file too)
        files = [[p.name, file_identity(p)] for p in sorted(folder.iterdir()) if p.is_file()]
    return {
        "name": name,
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "model": model,
        "files": files,
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "special_ids": getattr(tokenizer, "all_special_ids", None),
        "added": sorted((getattr(tokenizer, "get_added_vocab", dict)() or {}).items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "bos_token_id": getattr(tokenizer, "bos_token_id", None),
    }


def _source_files(classes: tuple[type, ...]) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    files = [
        p
        for name in CODE_FILES
        for p in sorted((root / name).rglob("*.py") if (root / name).is_dir() else [root / name])
    ]
    for cls in classes:  # a data module class of your own: its file too
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve() not in files:
            files.append(Path(path).resolve())
    return [str(p) for p in files]


def code_identity(classes: tuple[type, ...]) -> dict[str, Any]:
    """The library's version and the SHA-256 of its data code (and of the files defining ``classes``)."""
    from ulma_lightning._version import __version__

    files = _source_files(classes)
    return {"version": __version__, "code": [file_identity(Path(p)) for p in files if Path(p).is_file()]}


def digest(parts: Any) -> str:
    """The key of an entry: a SHA-256 of ``parts`` as canonical JSON (a value JSON cannot write: its repr)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- values
def _tagged(value: Any) -> dict[str, Any]:
    """A dataclass as JSON (for :func:`dumps`): its class and its fields; anything else is a :class:`CacheMiss`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if any(isinstance(v, tuple) for v in fields.values()):
            raise CacheMiss("a tuple field (JSON would give it back as a list)")
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise CacheMiss(f"a value of type {type(value).__name__}")


def dumps(value: Any) -> str:
    """``value`` (examples: dataclasses of strings, numbers, lists and dicts) as JSON, each dataclass
    tagged with its class; a value JSON cannot hold raises :class:`CacheMiss`."""
    try:
        return json.dumps(value, default=_tagged)
    except (TypeError, ValueError) as exc:  # e.g. a dict with non-string keys
        raise CacheMiss(str(exc)) from None


def _untag(value: dict[str, Any]) -> Any:
    if "__dataclass__" not in value:
        return value
    module, _, qualname = value["__dataclass__"].partition(":")
    cls: Any = sys.modules.get(module)  # only classes already imported: a cache file imports nothing
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"unknown record class {value['__dataclass__']}")
    return cls(**value["fields"])


def loads(text: str) -> Any:
    """The value :func:`dumps` wrote."""
    return json.loads(text, object_hook=_untag)


def encode_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Feature dicts as columns: 1-D numpy arrays (or lists of ints) concatenated into one tensor with
    offsets, scalars as lists, anything else as JSON (:func:`dumps`)."""
    names = list(items[0]) if items else []
    if any(list(item) != names for item in items):
        raise CacheMiss("feature dicts with different keys")
    columns: dict[str, Any] = {}
    for name in names:
        values = [item[name] for item in items]
        first = values[0]
        if (
            all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == first.dtype for v in values)
            and first.dtype.kind in "iufb"
        ):
            kind, arrays = "arrays", values
        elif all(isinstance(v, list) and all(type(x) is int for x in v) for v in values):
            kind, arrays = "int_lists", [np.asarray(v, dtype=np.int64) for v in values]
        elif all(v is None or type(v) in (bool, int, float, str) for v in values):
            columns[name] = {"kind": "scalars", "values": values}
            continue
        elif all(isinstance(v, torch.Tensor) for v in values):
            columns[name] = {"kind": "tensors", "values": [v.detach().cpu() for v in values]}
            continue
        else:
            columns[name] = {"kind": "json", "values": dumps(values)}
            continue
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        columns[name] = {
            "kind": kind,
            "flat": torch.from_numpy(np.ascontiguousarray(flat)),
            "lengths": torch.from_numpy(lengths),
        }
    return {"count": len(items), "names": names, "columns": columns}


def decode_items(data: dict[str, Any]) -> list[dict[str, Any]]:
    count, columns = data["count"], data["columns"]
    values: dict[str, list[Any]] = {}
    for name in data["names"]:
        column = columns[name]
        kind = column["kind"]
        if kind in ("arrays", "int_lists"):
            flat, lengths = column["flat"].numpy(), column["lengths"].numpy()
            if int(lengths.sum()) != len(flat) or len(lengths) != count:
                raise ValueError(f"column {name!r}: lengths do not add up")
            parts = np.split(flat, np.cumsum(lengths)[:-1]) if count else []
            values[name] = [p.tolist() for p in parts] if kind == "int_lists" else [p.copy() for p in parts]
        elif kind == "json":
            values[name] = loads(column["values"])
        else:
            values[name] = list(column["values"])
        if len(values[name]) != count:
            raise ValueError(f"column {name!r}: {len(values[name])} values for {count} samples")
    return [{name: values[name][i] for name in data["names"]} for i in range(count)]


# ----------------------------------------------------------------------------- files
class FeatureCache:
    """Entries ``KIND-KEY.pt`` in ``folder`` (created when first written)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(os.path.expanduser(str(folder)))

    def path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.pt"

    def load(self, kind: str, key: str) -> dict[str, Any] | None:
        """The entry's payload; None when there is none, or (with a warning) when it is unreadable."""
        path = self.path(kind, key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            head, _, rest = blob[len(MAGIC) :].partition(b"\n")
            if not blob.startswith(MAGIC) or head.decode("ascii", "replace") != hashlib.sha256(rest).hexdigest():
                raise ValueError("checksum mismatch: a partial or corrupt file")
            payload = torch.load(io.BytesIO(rest), weights_only=True)
            if (
                not isinstance(payload, dict)
                or payload.get("format") != FORMAT
                or payload.get("key") != key
                or payload.get("kind") != kind
            ):
                raise ValueError("not an entry of this key")
            return payload
        except Exception as exc:  # noqa: BLE001 (a damaged entry is rebuilt, whatever the damage)
            log.warning("features cache: %s is unreadable (%s); building it again", path, exc)
            return None

    def save(self, kind: str, key: str, payload: dict[str, Any]) -> Path:
        """Write the entry atomically (a temporary file in the folder, then :func:`os.replace`)."""
        buffer = io.BytesIO()
        torch.save({**payload, "format": FORMAT, "key": key, "kind": kind}, buffer)
        body = buffer.getvalue()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(kind, key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


# ----------------------------------------------------------------------------- logs
@contextmanager
def captured_logs(name: str = "ulma_lightning.data") -> Iterator[list[list[Any]]]:
    """Collect what logger ``name`` and its children log in the block (every level), as
    ``[logger, level, message]``; :func:`replay` logs them as they would have been."""
    logger = logging.getLogger(name)
    lines: list[list[Any]] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append([record.name, record.levelno, record.getMessage()])

    handler = _Collect(level=logging.NOTSET)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(1)
    logger.propagate = False
    handlers = [h for h in logger.handlers if h is not handler]
    for h in handlers:
        logger.removeHandler(h)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        for h in handlers:
            logger.addHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate


def replay(lines: list[list[Any]]) -> None:
    """Log lines collected by :func:`captured_logs` again, each on its own logger and level."""
    for name, level, message in lines:
        logging.getLogger(name).log(int(level), "%s", message)
