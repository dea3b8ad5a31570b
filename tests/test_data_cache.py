"""``cache_dir``: a split's records and tokenized features are saved once and loaded by later runs with
the same inputs; any changed input builds afresh; a damaged file is rebuilt with a warning."""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TINY_LLAMA

from ulma_lightning import (
    DemonstrationDataModule,
    PairwiseDataModule,
    PointwiseDataModule,
    PolicyConfig,
    PromptDataModule,
    ULMAModule,
)
from ulma_lightning.data.cache import FeatureCache

HH = "\n\nHuman: {q}\n\nAssistant: {a}"


def write_feedback(path: Path, records: list[dict] | None = None) -> Path:
    """A small point-wise .jsonl.gz file; record 3 is bad (no response), to be skipped and counted."""
    if records is None:
        records = [
            {
                "prompt": f"How do I bake bread number {i}?",
                "response": f"mix flour and water {i} times, then bake.",
                "score": float(i % 2),
            }
            for i in range(12)
        ]
        records[3] = {"prompt": "a prompt without a response", "score": 1.0}
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def setup(cls: type = PointwiseDataModule, stage: str = "fit", **kwargs) -> pl.LightningDataModule:
    dm = cls(**{"tokenizer": "builtin:demo", "max_length": 64, "batch_size": 4, **kwargs})
    dm.setup(stage)
    return dm


def same_items(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for name in x:
            if isinstance(x[name], np.ndarray):
                assert (
                    isinstance(y[name], np.ndarray)
                    and x[name].dtype == y[name].dtype
                    and np.array_equal(x[name], y[name])
                ), name
            else:
                assert type(x[name]) is type(y[name]) and x[name] == y[name], name


def same_setup(fresh, cached, splits: tuple[str, ...]) -> None:
    for split in splits:
        same_items(fresh.datasets[split].items, cached.datasets[split].items)
        assert cached.examples[split] == fresh.examples[split]
        assert vars(cached.truncated[split]) == vars(fresh.truncated[split])
        assert cached.skipped[split].as_dict() == fresh.skipped[split].as_dict()
        assert cached.skipped[split].examples == fresh.skipped[split].examples
    assert cached.mixed == fresh.mixed and cached.duplicates == fresh.duplicates


@pytest.mark.parametrize(
    ("cls", "source", "extra"),
    [
        (PointwiseDataModule, "demo://binary?n=40", {"val_fraction": 0.2, "max_length": 24}),  # held out, truncated
        (PairwiseDataModule, "demo://pairwise?n=20", {"val": "demo://pairwise?n=8&split=test"}),
        (
            DemonstrationDataModule,
            "demo://binary?n=30",
            {"min_score": 1.0, "val_fraction": 0.2},
        ),  # below min_score: counted skips
        (PromptDataModule, "demo://demonstration?n=20", {"val_fraction": 0.2}),
    ],
)
def test_second_setup_loads_the_same_features_counts_and_logs_from_the_cache(
    cls, source, extra, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"train": source, **extra}
    plain = setup(cls, **options)  # no cache: the reference
    caplog.set_level(logging.INFO, logger="ulma_lightning")
    caplog.clear()
    built = setup(cls, **options, cache_dir=str(tmp_path / "cache"))
    first = [r.getMessage() for r in caplog.records if "cache" not in r.getMessage()]
    assert "features: saved" in caplog.text and sorted(built.cache_used["saved"]) == []  # cleared once logged
    caplog.clear()
    loaded = setup(cls, **options, cache_dir=str(tmp_path / "cache"))
    again = [r.getMessage() for r in caplog.records if "cache" not in r.getMessage()]
    n_train, n_val = len(plain.datasets["train"]), len(plain.datasets["val"])
    assert (
        f"features: loaded {n_val} val / {n_train} train from cache" in caplog.text
        or f"features: loaded {n_train} train / {n_val} val from cache" in caplog.text
    )
    same_setup(plain, loaded, ("train", "val"))
    same_setup(plain, built, ("train", "val"))
    assert again == first  # every line the build logged (formats, truncation, skips, sizes) is logged again
    if cls is DemonstrationDataModule:
        assert loaded.skipped["train"].total > 0  # the records left out by min_score are still reported


def test_skipped_records_are_counted_and_logged_from_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_feedback(tmp_path / "feedback.jsonl.gz")
    options = {"train": str(data), "on_bad_record": "skip", "cache_dir": str(tmp_path / "cache")}
    setup(**options)
    caplog.set_level(logging.INFO, logger="ulma_lightning")
    caplog.clear()
    loaded = setup(**options)
    assert "features: loaded 11 train from cache" in caplog.text
    assert loaded.skipped["train"].total == 1
    assert "train split: skipped 1 record(s): field 'response'" in caplog.text and "feedback.jsonl.gz:4" in caplog.text


def losses(dm: pl.LightningDataModule, steps: int = 3) -> list[float]:
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            seen.append(float(outputs["loss"]))

    pl.seed_everything(0)
    module = ULMAModule(policy=PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return seen


@pytest.mark.integration
def test_training_on_cached_features_gives_the_same_losses(tmp_path: Path) -> None:
    options = {"train": "demo://binary?n=32", "cache_dir": str(tmp_path / "cache")}
    fresh = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, batch_size=4, **options)
    first = losses(fresh)
    cached = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, batch_size=4, **options)
    second = losses(cached)
    assert cached.datasets["train"] is not None and len(list((tmp_path / "cache").glob("features-*.pt"))) == 1
    assert len(first) == 3 and second == first


CHANGES = {
    "tokenizer": {"tokenizer": "builtin:task"},
    "max_length": {"max_length": 20},
    "max_prompt_length": {"max_length": 20, "max_prompt_length": 4},
    "columns": {"columns": {"response": "answer"}},
    "score_range": {"score_range": (0.0, 2.0)},
    "max_samples": {"max_samples": 5},
    "class": {"cls": DemonstrationDataModule},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_option_builds_afresh(change: str, tmp_path: Path) -> None:
    records = [
        {
            "prompt": f"Q{i}: how do I plant tomatoes in a sunny spot of the garden?",
            "response": f"dig a deep hole {i}",
            "answer": f"water it {i}",
            "score": float(i % 2),
        }
        for i in range(10)
    ]
    data = write_feedback(tmp_path / "data.jsonl.gz", records)
    base = {"train": str(data), "cache_dir": str(tmp_path / "cache")}
    first = setup(**base)
    assert setup(**base).cache_used == {"loaded": {}, "saved": {}}  # logged and cleared; the positive control:
    control = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, **base)
    control._setup("fit")
    assert control.cache_used["loaded"] == {"train": len(first.datasets["train"])}

    changed = {**base, **CHANGES[change]}
    cls = changed.pop("cls", PointwiseDataModule)
    expected = setup(cls, **{k: v for k, v in changed.items() if k != "cache_dir"})  # built without the cache
    dm = cls(**{"tokenizer": "builtin:demo", "max_length": 64, **changed})
    dm._setup("fit")
    assert dm.cache_used["loaded"] == {} and dm.cache_used["saved"] == {"train": len(expected.datasets["train"])}
    same_items(expected.datasets["train"].items, dm.datasets["train"].items)


def test_a_changed_file_builds_afresh_even_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"prompt": "How do I bake bread?", "response": "mix flour and water", "score": 1.0}) + "\n"
    )
    options = {"train": str(data), "cache_dir": str(tmp_path / "cache")}
    first = setup(**options)
    stat = data.stat()
    data.write_text(
        json.dumps({"prompt": "How do I bake bread?", "response": "mix FLOUR and water", "score": 1.0}) + "\n"
    )
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    second = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, **options)
    second._setup("fit")
    assert second.cache_used["loaded"] == {}
    assert second.examples["train"][0].response == "mix FLOUR and water"
    assert not np.array_equal(
        first.datasets["train"].items[0]["input_ids"], second.datasets["train"].items[0]["input_ids"]
    )


def test_a_changed_builtin_source_seed_builds_afresh(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    first = setup(train="demo://binary?n=10&seed=1", cache_dir=cache)
    second = setup(train="demo://binary?n=10&seed=2", cache_dir=cache)
    assert first.examples["train"] != second.examples["train"]
    assert len(list(Path(cache).glob("records-*.pt"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "not ours"])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    options = {"train": "demo://binary?n=20", "cache_dir": str(cache)}
    fresh = setup(**options)
    for path in cache.glob("*.pt"):
        blob = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(blob[: len(blob) // 2])
        elif damage == "flipped byte":
            path.write_bytes(blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:])
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            torch.save({"items": "garbage"}, path)
    caplog.clear()
    rebuilt = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, **options)
    rebuilt._setup("fit")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "is unreadable" in r.getMessage()]
    assert len(warnings) == 2 and "building it again" in warnings[0].getMessage()  # records and features
    assert rebuilt.cache_used["saved"] == {"train": len(fresh.datasets["train"])}
    same_setup(fresh, rebuilt, ("train",))
    again = PointwiseDataModule(tokenizer="builtin:demo", max_length=64, **options)
    again._setup("fit")
    assert again.cache_used["loaded"] == {"train": len(fresh.datasets["train"])}  # the rebuilt files are whole


def test_writers_racing_on_one_entry_leave_a_whole_file(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    payload = {"values": torch.arange(200_000), "text": "x" * 10_000}
    errors: list[BaseException] = []
    seen: list[bool] = []

    def write() -> None:
        try:
            for _ in range(5):
                cache.save("features", "k", payload)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def read() -> None:
        for _ in range(20):
            entry = cache.load("features", "k")
            seen.append(entry is None or bool(torch.equal(entry["values"], payload["values"])))

    threads = [threading.Thread(target=write), threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(seen)
    assert [p.name for p in tmp_path.iterdir()] == ["features-k.pt"]  # no temporary file left behind
    assert torch.equal(cache.load("features", "k")["values"], payload["values"])


def test_cache_files_load_with_weights_only(tmp_path: Path) -> None:
    setup(train="demo://binary?n=10", cache_dir=str(tmp_path))
    for path in tmp_path.glob("*.pt"):
        kind, key = path.stem.split("-", 1)
        assert FeatureCache(tmp_path).load(kind, key) is not None  # torch.load(weights_only=True) inside


def test_a_tokenizer_folder_rewritten_in_place_builds_afresh(tmp_path: Path) -> None:
    from ulma_lightning.tokenizers import load_tokenizer

    folder, cache = tmp_path / "tokenizer", str(tmp_path / "cache")
    load_tokenizer("builtin:demo").save_pretrained(folder)
    first = setup(train="demo://binary?n=10", tokenizer=str(folder), cache_dir=cache)
    load_tokenizer("builtin:task").save_pretrained(folder)  # same name, other vocabulary
    second = PointwiseDataModule(train="demo://binary?n=10", tokenizer=str(folder), max_length=64, cache_dir=cache)
    second._setup("fit")
    assert second.cache_used["loaded"] == {} and second.cache_used["saved"] == {"train": 10}
    assert not np.array_equal(
        first.datasets["train"].items[0]["input_ids"], second.datasets["train"].items[0]["input_ids"]
    )


@pytest.mark.parametrize("failure", ["full disk", "read-only folder"])
def test_a_cache_that_cannot_be_written_warns_and_the_setup_goes_on(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26, item 8: a failed cache write stopped the fit with a raw OSError naming no option."""
    import errno

    def cannot_write(self, kind, key, payload):
        code = errno.ENOSPC if failure == "full disk" else errno.EROFS
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(FeatureCache, "save", cannot_write)
    source = write_feedback(tmp_path / "feedback.jsonl.gz")
    fresh = setup(train=str(source), val=str(source), on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="ulma_lightning.data"):
        dm = setup(train=str(source), val=str(source), on_bad_record="skip", cache_dir=str(tmp_path / "cache"))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "features cache" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings  # once, not per split
    assert (
        f"cannot write to data.init_args.cache_dir {tmp_path / 'cache'}" in warnings[0]
        and os.strerror(errno.ENOSPC if failure == "full disk" else errno.EROFS) in warnings[0]
    )
    same_setup(fresh, dm, ("train", "val"))
    assert dm.cache_used["saved"] == {}
