"""LightningDataModules: sources -> validated examples -> tokenized features -> padded batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ulma_lightning.choices import check_choices
from ulma_lightning.data.cache import (
    CacheMiss,
    FeatureCache,
    captured_logs,
    code_identity,
    decode_items,
    digest,
    dumps,
    encode_items,
    loads,
    replay,
    source_identity,
    tokenizer_identity,
)  # fmt: skip
from ulma_lightning.data.collate import PaddingCollator
from ulma_lightning.data.contract import PredictInputs
from ulma_lightning.data.demo import demo_test_source, is_demo_source
from ulma_lightning.data.errors import DataError, OnBadRecord, SkipReport
from ulma_lightning.data.features import FeatureDataset, Truncation, TruncationReport, encode_pairs
from ulma_lightning.data.mixing import MixStrategy, SourceSpec, SplitSources, describe, mix, records_of, source_specs
from ulma_lightning.data.prompts import LeftPaddingCollator, PromptDataset, encode_prompts
from ulma_lightning.data.records import Example, apply_columns, format_label, in_user_terms, parse_pointwise
from ulma_lightning.data.samplers import ResumableDataLoader, ResumableSampler
from ulma_lightning.data.sources import MAX_RECORD_CHARS, Location, read_source, text_size, too_long
from ulma_lightning.losses import LabelType
from ulma_lightning.options import check_numbers
from ulma_lightning.tokenizers import load_tokenizer, pad_token_id

log = logging.getLogger("ulma_lightning.data")
T = TypeVar("T")

Split = Literal["train", "val", "test", "predict"]
#: how a continuous score maps onto [0, 1]: the top of ``score_range`` becomes 1, or the bottom does
ScoreDirection = Literal["higher_is_better", "lower_is_better"]

#: attributes of a data module left out of its cache keys: state filled by setup, and options that only
#: batch the features (every other attribute, a subclass's own included, is part of the key)
NOT_IN_CACHE_KEY = frozenset(
    {
        "datasets", "examples", "skipped", "truncated", "mixed", "duplicates", "reading", "trainer", "cache",
        "cache_dir", "cache_used", "specs", "sources", "test_from_val", "batch_size", "eval_batch_size",
        "predict_inputs", "num_workers", "group_by_length", "pad_to_multiple_of", "_building", "_pending_extra",
        "_before_loading", "_tokenizer", "_report", "_said_responses_ignored", "_identity_key", "_cache_unwritable",
    }
)  # fmt: skip


def _text_key(example: Any) -> str:
    """An example's text (every field but its location and score), to find duplicates by."""
    fields = {k: v for k, v in vars(example).items() if k not in ("location", "score")}
    return json.dumps(fields, sort_keys=True, default=str)


def record_groups(examples: list[Any]) -> tuple[list[list[int]], int]:
    """Example indices grouped for the validation hold-out, and the count of duplicate records.

    A group is a record (the two samples of a pair stay together) joined with every record that
    repeats one of its examples' text (prompt and response, whatever the score), so a duplicate
    cannot land on both sides of the split.
    """
    records: dict[Any, list[int]] = {}
    for i, example in enumerate(examples):
        records.setdefault(example.location, []).append(i)
    parent = list(range(len(records)))

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = g = parent[parent[g]]
        return g

    owner: dict[str, int] = {}
    duplicates = 0
    for g, rows in enumerate(records.values()):
        seen = False
        for key in (_text_key(examples[i]) for i in rows):
            if key in owner:
                seen = True
                parent[root(g)] = root(owner[key])
            else:
                owner[key] = g
        duplicates += seen
    groups: dict[int, list[int]] = {}
    for g, rows in enumerate(records.values()):
        groups.setdefault(root(g), []).extend(rows)
    return list(groups.values()), duplicates


def demo_test_sources(train: list[Any]) -> list[Any]:
    """The demo task's test split of each demo source of ``train``, with its options (not its share of the mix)."""
    out: list[Any] = []
    for entry in train:
        if isinstance(entry, str):
            out.append(demo_test_source(entry))
        else:
            kept = {k: v for k, v in entry.items() if k not in ("weight", "samples")}
            out.append({**kept, "source": demo_test_source(entry["source"])})
    return out


class AlignmentDataModule(pl.LightningDataModule):
    """Shared pipeline for every data module; subclasses parse records and build features.

    Args:
        train: training data: a file (.jsonl/.json/.parquet/.csv, optionally .gz), a dataset folder,
            ``hf://OWNER/NAME?split=...``, ``demo://binary`` / ``demo://continuous``, or ``task://KIND``;
            or a list of sources mixed into one split, each a string or a mapping ``{source, score,
            columns, score_range, on_bad_record, weight, samples}`` (see :mod:`ulma_lightning.data.mixing`).
        val: validation data (same forms); if empty, ``val_fraction`` of ``train`` is held out.
        test: test data (same forms), used by ``ulma test`` and ``ulma evaluate``. Default: for the
            demo task, its test split (of each source, for a list of demo sources); for your own data,
            the validation data (``val``, or the share of ``train`` that ``val_fraction`` holds out).
        predict: prompts for ``ulma predict`` (defaults to the test data): one prompt per record, cut from
            the left to ``max_prompt_length`` tokens, with the record's response (or chosen side) as
            the reference response.
        tokenizer: the tokenizer (hub id, folder, ``builtin:demo``, ``builtin:task``). The CLI links it to the model's.
        columns: our field name -> the column that holds it, e.g. ``{response: completion}``.
        max_length: tokens per sequence after truncation.
        max_prompt_length: the least prompt tokens kept when truncating (default ``max_length // 2``).
        batch_size: training samples per step and process.
        eval_batch_size: samples per validation/test step (default ``batch_size``).
        val_fraction: share of ``train`` records held out for validation when ``val`` is empty (both
            samples of a pair, and records that repeat each other's text, stay on the same side;
            duplicates are counted in the log).
        split_seed: seed of that hold-out and of the training order.
        group_by_length: batch samples of similar length together (less padding, still shuffled).
        pad_to_multiple_of: pad batch lengths to a multiple of this (tensor-core friendly).
        num_workers: data loader workers.
        on_bad_record: ``error`` stops at the first bad record, naming file, line and field;
            ``skip`` skips such records and reports how many, by reason.
        max_samples: keep only the first N examples of each split (quick experiments).
        trust_remote_code: allow tokenizer code from the hub.
        mix_strategy: how sources with a ``weight`` share a split: ``interleave_under`` (no record
            repeats; the first source to run out sets the size) or ``interleave_over`` (every record
            is used; the others repeat), as LLaMA-Factory's ``mix_strategy``.
        cache_dir: a folder where each split's records and tokenized features are saved after their
            first build and loaded by later runs with the same inputs (keyed by the sources' content,
            the tokenizer, truncation, every data option and the library version; see
            :mod:`ulma_lightning.data.cache`). None (default): no cache.
        max_record_chars: the most characters a record may hold (a ``.jsonl`` line, or the text of a
            record of another format): a longer one is a bad record (``on_bad_record``), found before
            it is parsed or tokenized, so one huge line cannot fill the memory. Raise it for longer
            records; None: no limit.
        label_type: the labels the method reads: ``binary`` makes a score other than the ends of
            ``score_range`` a bad record; ``continuous`` or None: any score in the range. ``ulma``
            links it to the model's declaration (``MethodSpec.label_type``); not a config option.
        predict_inputs: what ``ulma predict`` batches hold: ``prompts`` (prompt-only, left-padded, to
            generate) or ``sequences`` (full samples, e.g. for a reward model to score). ``ulma``
            links it to the model's declaration (``MethodSpec.predict_inputs``); not a config option.
    """

    def __init__(
        self,
        train: SplitSources | None = None,
        val: SplitSources | None = None,
        test: SplitSources | None = None,
        predict: SplitSources | None = None,
        tokenizer: str = "builtin:demo",
        columns: dict[str, str] | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        on_bad_record: OnBadRecord = "error",
        max_samples: int | None = None,
        trust_remote_code: bool = False,
        mix_strategy: MixStrategy = "interleave_under",
        cache_dir: str | None = None,
        max_record_chars: int | None = MAX_RECORD_CHARS,
        label_type: LabelType | None = None,
        predict_inputs: PredictInputs = "prompts",
    ) -> None:
        super().__init__()
        check_numbers(max_record_chars=(max_record_chars, ">= 1"))
        check_numbers(
            batch_size=(batch_size, ">= 1"), eval_batch_size=(eval_batch_size, ">= 1"), max_length=(max_length, ">= 1"),
            max_prompt_length=(max_prompt_length, ">= 0"), val_fraction=(val_fraction, "in [0, 1)"),
            pad_to_multiple_of=(pad_to_multiple_of, ">= 1"), num_workers=(num_workers, ">= 0"),
            max_samples=(max_samples, ">= 1"),
        )  # fmt: skip
        check_choices(
            on_bad_record=(on_bad_record, get_args(OnBadRecord)), mix_strategy=(mix_strategy, get_args(MixStrategy))
        )
        check_choices(
            label_type=(label_type, (*get_args(LabelType), None)),
            predict_inputs=(predict_inputs, get_args(PredictInputs)),
        )
        #: the method's label kind and ``ulma predict``'s inputs (the contract's ModuleData; linked by ``ulma``)
        self.label_type, self.predict_inputs = label_type, predict_inputs
        if test is None and isinstance(train, str) and is_demo_source(train):
            test = demo_test_source(train)
        elif (
            test is None
            and isinstance(train, list)
            and all(is_demo_source(spec.source) for spec in source_specs(train, "train") or [])
        ):
            test = demo_test_sources(train)
        #: test (and predict) fall back to the validation examples: the user's own data, no test set named
        self.test_from_val = test is None
        given = {"train": train, "val": val, "test": test, "predict": predict or test}
        #: each split's sources with their own options (None: the split has none)
        self.specs: dict[str, list[SourceSpec] | None] = {
            split: source_specs(value, split) for split, value in given.items()
        }
        #: each split's sources as one string (the source itself for a single one)
        self.sources = {split: describe(specs) for split, specs in self.specs.items()}
        self.mix_strategy = mix_strategy
        for split, specs in self.specs.items():
            for spec in specs or []:
                unused = [
                    name
                    for name in ("score", "score_range")
                    if getattr(spec, name) is not None and name not in self.scored_options
                ]
                if unused:
                    raise ValueError(
                        f"data.{split}: source {spec.source}: {type(self).__name__} has no use for "
                        f"{' and '.join(unused)} (its records are not scored); drop it, or use PointwiseDataModule"
                    )
        self.reading: SourceSpec | None = None  # the source being read, whose options override the module's
        self.mixed: dict[str, dict[str, dict[str, int]]] = {}  # split -> source -> samples read, skipped, records drawn
        self.tokenizer_source = tokenizer
        self.trust_remote_code = trust_remote_code
        self.columns = columns
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.on_bad_record = on_bad_record
        self.max_samples = max_samples
        self.max_record_chars = max_record_chars
        self.datasets: dict[str, FeatureDataset] = {}
        self.examples: dict[str, list[Any]] = {}
        self.skipped: dict[str, SkipReport] = {}
        self.truncated: dict[str, TruncationReport] = {}  # per split, filled by truncate()
        self.duplicates = 0  # train records that repeat an earlier one (counted when val is held out)
        self._building = "train"  # the split build_features is working on
        self._pending_extra: dict[str, dict[str, torch.Tensor]] = {}
        self._before_loading: list[Callable[[], None]] = []
        self._tokenizer: Any = None
        self.cache_dir = cache_dir
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        #: samples per split whose features setup loaded from the cache ("loaded") or built and saved ("saved")
        self.cache_used: dict[str, dict[str, int]] = {"loaded": {}, "saved": {}}
        self._identity_key: str | None = None  # _identity_digest's, per setup

    #: the per-source options about scores this module reads (see :mod:`ulma_lightning.data.mixing`)
    scored_options: tuple[str, ...] = ()

    # ------------------------------------------------------------ to override
    def parse_record(self, record: dict[str, Any], location: Location) -> list[Any]:
        """Validated examples from one raw record (after column mapping); raise DataError if bad."""
        raise NotImplementedError

    def build_features(self, examples: list[Any], report: SkipReport) -> list[dict[str, Any]]:
        """Tokenized feature dicts for the examples; count (in ``report``) those dropped."""
        raise NotImplementedError

    # ------------------------------------------------------------ pipeline
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    @property
    def truncation(self) -> Truncation:
        """Truncation to ``max_length``; a BOS the tokenizer puts first in prompts stays first."""
        return Truncation(self.max_length, self.max_prompt_length, self.tokenizer.bos_token_id)

    def option(self, name: str) -> Any:
        """The option ``name`` of the source being read (:attr:`reading`), else the data module's."""
        value = getattr(self.reading, name, None) if self.reading is not None else None
        return value if value is not None else getattr(self, name, None)

    def read_split(self, split: str, report: SkipReport) -> list[Any]:
        """The examples of ``split``: its one source's, or its sources' mixed (:mod:`~ulma_lightning.data.mixing`);
        each source's records, samples and skips are logged (and kept in :attr:`mixed`). With
        ``cache_dir``, loaded from the cache when these sources were read the same way before."""
        if self.cache is None:
            return self._read_split(split, report)
        sources = [[dataclasses.asdict(spec), source_identity(spec.source)] for spec in self.specs[split] or []]

        def restore(entry: dict[str, Any]) -> list[Any]:
            examples = loads(entry["examples"])
            self.mixed[split] = entry["mixed"]
            return examples

        examples, _ = self._cached(
            "records", [self._identity_digest(), "records", split, sources], report,
            build=lambda: self._read_split(split, report),
            pack=lambda examples: {"examples": dumps(examples), "mixed": self.mixed.get(split, {})},
            restore=restore,
            what=f"the {split} split's records",
        )  # fmt: skip
        return examples

    def _cached(
        self,
        kind: str,
        identity: list[Any],
        report: SkipReport,
        build: Callable[[], T],
        pack: Callable[[T], dict[str, Any]],
        restore: Callable[[dict[str, Any]], T],
        what: str,
    ) -> tuple[T, str]:
        """``build()``'s value, or the one saved in the cache under ``identity``: ``restore(entry)`` reads it
        back (a damaged entry is built again), and the skips and log lines that building gave are replayed.
        A built value is saved (``pack`` it, with those skips and lines) unless it cannot be (:class:`CacheMiss`).
        Returns the value and ``"loaded"``, ``"saved"`` or ``"built"``."""
        assert self.cache is not None
        key = digest(identity)
        entry = self.cache.load(kind, key)
        if entry is not None:
            try:
                value = restore(entry)
            except Exception as exc:  # noqa: BLE001 (a damaged entry is rebuilt)
                log.warning("features cache: %s is unreadable (%s); building it again", self.cache.path(kind, key), exc)
            else:
                self._restore_skips(report, entry["skipped"])
                replay(entry["logs"])
                return value, "loaded"
        before = dict(report.counts)
        lines: list[list[Any]] = []
        try:
            with captured_logs() as lines:
                value = build()
        finally:
            replay(lines)
        try:
            payload = {**pack(value), "skipped": self._skips_since(report, before), "logs": lines}
        except CacheMiss as exc:
            log.info("features cache: %s are not cached (%s)", what, exc)
            return value, "built"
        if getattr(self, "_cache_unwritable", False):
            return value, "built"
        try:
            self.cache.save(kind, key, payload)
        except OSError as exc:  # the cache only saves time: a full disk or a read-only folder does not stop the run
            self._cache_unwritable = True
            log.warning(
                "features cache: cannot write to data.init_args.cache_dir %s (%s); going on without saving to it. "
                "Free space there, make it writable, or set data.init_args.cache_dir to another folder (or null)",
                self.cache.folder, exc,
            )  # fmt: skip
            return value, "built"
        return value, "saved"

    def _read_split(self, split: str, report: SkipReport) -> list[Any]:
        """:meth:`read_split` without the cache."""
        specs = self.specs[split] or []
        parts, counts = [], {}
        names = [
            spec.source if [s.source for s in specs].count(spec.source) == 1 else f"{spec.source} [{i}]"
            for i, spec in enumerate(specs)
        ]
        for spec, name in zip(specs, names):
            skipped = report.total
            self.reading = spec
            try:
                parts.append(self.read_examples(spec.source, split, report))
            finally:
                self.reading = None
            counts[name] = {"samples": len(parts[-1]), "skipped": report.total - skipped}
        if len(specs) == 1 and specs[0].weight is None and specs[0].samples is None:
            self.mixed[split] = {names[0]: {**counts[names[0]], "records_drawn": len(records_of(parts[0]))}}
            return parts[0]
        examples, drawn = mix(parts, specs, self.split_seed, self.mix_strategy)
        self.mixed[split] = {}
        for name, records in zip(names, drawn):
            count = counts[name]
            self.mixed[split][name] = {**count, "records_drawn": records}
            log.info(
                "%s split: source %s: %d samples read (%d skipped), %d records drawn per epoch", split, name,
                count["samples"], count["skipped"], records,
            )  # fmt: skip
        if self.max_samples is not None:
            examples = examples[: self.max_samples]
        return examples

    def read_examples(self, source: str, split: str, report: SkipReport) -> list[Any]:
        """All valid examples of a source; bad records raise or are counted per ``on_bad_record``.

        A source with no record, or none usable, is a :class:`DataError` naming it and the split. The
        record formats found are logged once (see :func:`~ulma_lightning.data.records.detect_format`).
        """
        examples: list[Any] = []
        records = 0
        columns, on_bad_record = self.option("columns"), self.option("on_bad_record")
        formats: dict[str, int] = {}
        for raw, location in read_source(
            source, {"val": "validation", "predict": "test"}.get(split, split), self.max_record_chars
        ):
            records += 1
            try:
                size = 0 if self.max_record_chars is None or isinstance(raw, DataError) else text_size(raw)
                if self.max_record_chars is not None and size > self.max_record_chars:
                    raise too_long(location, f"{size:,} characters of text", self.max_record_chars)
                record = apply_columns(raw, columns, location)
                label = format_label(record)
                formats[label] = formats.get(label, 0) + 1
                examples += self.parse_record(record, location)
            except DataError as err:
                err = in_user_terms(err, columns)
                if on_bad_record == "error":
                    raise err from None
                report.add(
                    err.problem if err.field is None else f"field {err.field!r}: {err.problem}", str(err.location)
                )
            if self.max_samples is not None and len(examples) >= self.max_samples:
                break
        if formats:
            found = ", ".join(f"{name}: {n}" for name, n in sorted(formats.items(), key=lambda kv: -kv[1]))
            log.info("%s split: %s: record format %s", split, source, found)
        if not examples:
            problem = "it holds no records (an empty file?)"
            if records:
                problem = f"none of its {records} records is usable (skipped: {report.as_dict()})"
            hint = f"give data.{split} a source with usable records"
            raise DataError(Location(source), None, f"the {split} split has no usable samples: {problem}", hint)
        return examples[: self.max_samples] if self.max_samples is not None else examples

    def encode_examples(self, prompts: list[Any], responses: list[Any]) -> list[tuple[Any, Any] | None]:
        """``(input_ids, labels)`` per (prompt, response), or None where no response token is left."""
        return encode_pairs(self.tokenizer, prompts, responses, self.truncate)  # type: ignore[return-value]

    def truncate(
        self, prompt: list[int], response: list[int], kept_prompt: list[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """``truncation.apply`` (or, given ``kept_prompt``, the response cut to fit beside it), counted
        in ``truncated[split]`` for the split being built."""
        if kept_prompt is None:
            kept_prompt, kept_response = self.truncation.apply(prompt, response)
        else:
            kept_response = response[: max(self.max_length - len(kept_prompt), 0)]
        report = self.truncated.setdefault(self._building, TruncationReport(self._building))
        report.add(len(prompt), len(kept_prompt), len(response), len(kept_response))
        return kept_prompt, kept_response

    def _build_split(self, split: str, examples: list[Any], source: str) -> None:
        self.examples[split] = examples
        report = self.skipped.setdefault(split, SkipReport(split))
        self._building = split
        self.truncated[split] = TruncationReport(split)
        dataset = FeatureDataset(self._features(split, examples, report))
        self.truncated[split].log(log, self.truncation)
        for index, item in enumerate(dataset.items):
            item["index"] = index
        dataset.extra.update(self._pending_extra.pop(split, {}))
        report.log()
        if not len(dataset):
            raise DataError(
                Location(source),
                None,
                f"the {split} split has no usable samples (skipped: {report.as_dict()})",
                f"raise max_length, or give data.{split} a source with usable records",
            )
        self.datasets[split] = dataset
        log.info("%s split: %d samples", split, len(dataset))

    # ------------------------------------------------------------ the feature cache (cache_dir)
    def _cache_identity(self) -> list[Any]:
        """What every cache key of this module holds: class, options, tokenizer, truncation, code."""
        classes = tuple(c for c in type(self).__mro__ if issubclass(c, AlignmentDataModule))
        options = {name: value for name, value in vars(self).items() if name not in NOT_IN_CACHE_KEY}
        return [
            [f"{c.__module__}.{c.__qualname__}" for c in classes], options,
            tokenizer_identity(self.tokenizer, self.tokenizer_source), dataclasses.asdict(self.truncation),
            code_identity(classes),
        ]  # fmt: skip

    def _identity_digest(self) -> str:
        """:meth:`_cache_identity` hashed, once per setup (it hashes the tokenizer and the library's code)."""
        if self._identity_key is None:
            self._identity_key = digest(self._cache_identity())
        return self._identity_key

    @staticmethod
    def _skips_since(report: SkipReport, before: dict[str, int]) -> list[list[Any]]:
        """The skips ``report`` counted since ``before`` (its counts then): [reason, count, first example]."""
        return [
            [reason, n - before.get(reason, 0), report.examples[reason]]
            for reason, n in report.counts.items()
            if n > before.get(reason, 0)
        ]

    @staticmethod
    def _restore_skips(report: SkipReport, skips: list[list[Any]]) -> None:
        for reason, count, example in skips:
            report.counts[reason] += int(count)
            report.examples.setdefault(reason, example)

    def _features(self, split: str, examples: list[Any], report: SkipReport) -> list[dict[str, Any]]:
        """:meth:`build_features` of ``examples`` (counting truncation in ``truncated[split]``), or, with
        ``cache_dir``, the features, truncation counts and skips saved when the same examples were built."""
        if self.cache is None:
            return self.build_features(examples, report)
        try:
            content = hashlib.sha256(dumps(examples).encode()).hexdigest()
        except CacheMiss as exc:
            log.info("features cache: the %s split is not cached (its examples hold %s)", split, exc)
            return self.build_features(examples, report)

        def restore(entry: dict[str, Any]) -> list[dict[str, Any]]:
            items = decode_items(entry["items"])
            self.truncated[split] = TruncationReport(**entry["truncation"])
            return items

        items, state = self._cached(
            "features", [self._identity_digest(), "features", split, content], report,
            build=lambda: self.build_features(examples, report),
            pack=lambda items: {"items": encode_items(items), "truncation": dataclasses.asdict(self.truncated[split])},
            restore=restore,
            what=f"the {split} split's features",
        )  # fmt: skip
        if state != "built":
            self.cache_used[state][split] = len(items)
        return items

    def _log_cache_use(self) -> None:
        """One line per setup that used the cache: the samples loaded from it, or built and saved to it
        (on the data log when it shows INFO, else on Lightning's console)."""
        for what, preposition in (("loaded", "from"), ("saved", "to")):
            done = self.cache_used[what]
            if done:
                counts = " / ".join(f"{n} {split}" for split, n in done.items())
                line = f"features: {what} {counts} {preposition} cache {self.cache_dir}"
                if log.isEnabledFor(logging.INFO):
                    log.info("%s", line)
                else:  # shown where the data log is not (``ulma fit``): on Lightning's console, once per run
                    rank_zero_info(line)
                done.clear()

    def setup(self, stage: str | None = None) -> None:
        self._identity_key = None  # options may have changed since the last setup
        try:
            self._setup(stage)
        finally:
            self._log_cache_use()

    def _setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        splits = wanted.get(stage or "fit", ["train", "val", "test"]) if stage else ["train", "val", "test"]
        holds_out = self.sources["val"] is None and self.val_fraction > 0 and self.sources["train"] is not None
        for split in splits:
            if split in self.datasets:
                continue
            if holds_out and split in ("train", "val"):
                self._hold_out_validation()  # builds both splits from one read: nothing counted twice
                continue
            if split == "val" and self.sources["val"] is None:
                continue
            if self.sources[split] is None and split in ("test", "predict") and self.test_from_val:
                self._split_from_val(split)
                continue
            source = self.sources[split]
            if source is None:
                if split == "train":
                    raise ValueError("no training data: set data.train (a file, folder, hf://... or demo://binary)")
                continue
            report = self.skipped.setdefault(split, SkipReport(split))
            if split == "predict" and self.predict_inputs == "prompts":
                self.examples[split] = self.read_split(split, report)
                self.datasets[split] = self.prompt_dataset(split)  # type: ignore[assignment]
                continue
            self._build_split(split, self.read_split(split, report), source)

    def has_split(self, split: str) -> bool:
        """Whether ``split`` has data: a source, or (test, predict) the validation data it falls back to."""
        if self.sources.get(split) is not None:
            return True
        held_out = self.sources["train"] is not None and self.val_fraction > 0
        return split in ("test", "predict") and self.test_from_val and (self.sources["val"] is not None or held_out)

    def source_of(self, split: str) -> str | None:
        """Where ``split``'s records come from: its source, else the validation data's (val, or train
        when val is held out from it)."""
        source = self.sources.get(split)
        if source is None and (split == "val" or (split in ("test", "predict") and self.test_from_val)):
            source = self.sources["val"] or self.sources["train"]
        return source

    def _split_from_val(self, split: str) -> None:
        """Build ``split`` (test or predict) from the validation examples, when ``test`` is not set."""
        if not self.has_split(split):
            return
        if "val" not in self.examples:
            if self.sources["val"] is None:
                self._hold_out_validation()
            else:
                report = self.skipped.setdefault("val", SkipReport("val"))
                self._build_split("val", self.read_split("val", report), self.sources["val"])
        log.info("%s split: the validation data (data.test is not set)", split)
        if split == "predict" and self.predict_inputs == "prompts":
            self.examples[split] = list(self.examples["val"])
            self.datasets[split] = self.prompt_dataset(split)  # type: ignore[assignment]
        else:
            self._build_split(split, list(self.examples["val"]), f"{self.source_of(split)} (the validation data)")

    def _hold_out_validation(self) -> None:
        if self.val_fraction == 0 or self.sources["train"] is None:
            return
        report = self.skipped.setdefault("train", SkipReport("train"))
        examples = self.read_split("train", report)
        groups, duplicates = record_groups(examples)
        if duplicates:
            log.info(
                "train split: %d record(s) repeat an earlier record's text; duplicates are held out together "
                "(val_fraction counts groups), so none sits on both sides of the train/val split", duplicates,
            )  # fmt: skip
        self.duplicates = duplicates
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(groups), generator=generator).tolist()
        n_val = max(1, int(round(len(groups) * self.val_fraction)))
        val_rows = sorted(i for g in order[:n_val] for i in groups[g])
        train_rows = sorted(i for g in order[n_val:] for i in groups[g])
        source = self.sources["train"]
        if not train_rows:
            distinct = " distinct" if duplicates else ""
            problem = (
                f"val_fraction={self.val_fraction} holds out all {len(groups)} of its{distinct} records for validation"
            )
            hint = "lower val_fraction, or add records"
            raise DataError(Location(source), None, f"the train split has no usable samples: {problem}", hint)
        self._build_split("val", [examples[i] for i in val_rows], f"{source} (held out by val_fraction)")
        self.datasets.pop("train", None)
        self._build_split("train", [examples[i] for i in train_rows], source)

    # ------------------------------------------------------------ loaders
    @property
    def collator(self) -> PaddingCollator:
        return PaddingCollator(pad_token_id(self.tokenizer), self.pad_to_multiple_of)

    def _loader(self, split: str, shuffle: bool, collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        dataset = self.datasets[split]
        if shuffle:
            return self._train_loader(dataset)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=self._equal_shares(dataset) if split == "predict" else None,
            collate_fn=collate_fn or self.collator,
            num_workers=self.num_workers,
        )

    def _equal_shares(self, dataset: Any) -> DistributedSampler | None:
        """On several processes, the same number of samples (so of batches) on each, in order; the
        last few repeat samples of the start, which the prediction writer drops by index.

        Lightning's own share in ``predict`` is unequal, and a sharded model (FSDP, FSDP2) hangs when
        one process runs a forward more than another. None on one process (Lightning's default).
        """
        replicas, rank = self._data_parallel()
        if replicas == 1:
            return None
        return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False, drop_last=False)

    def _data_parallel(self) -> tuple[int, int]:
        """(processes, rank) of data parallelism, from the trainer's strategy; (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
        if not kwargs:
            return 1, 0
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def train_batches_per_epoch(self) -> int:
        """Training batches per epoch and process (the train loader's length), without building it."""
        replicas, _ = self._data_parallel()
        return math.ceil(len(self.datasets["train"]) / (self.batch_size * replicas))

    def _batches_done(self) -> int:
        """Batches of the current epoch the fit loop has consumed (0 outside a fit)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _train_loader(self, dataset: FeatureDataset) -> DataLoader:
        """Shuffled (or length-grouped) batches from a seeded global order, split across processes and
        resumable mid-epoch (see :mod:`ulma_lightning.data.samplers`)."""
        replicas, rank = self._data_parallel()
        sampler = ResumableSampler(
            dataset,
            self.batch_size,
            num_replicas=replicas,
            rank=rank,
            seed=self.split_seed,
            lengths=dataset.lengths() if self.group_by_length else None,
        )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            progress=self._batches_done,
        )

    def run_before_loading(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once, when the next train or validation loader is requested (e.g. to attach a
        precomputed column after Lightning has restored a checkpoint)."""
        self._before_loading.append(fn)

    def _prepare_loading(self) -> None:
        while self._before_loading:
            self._before_loading.pop(0)()

    def train_dataloader(self) -> DataLoader:
        self._prepare_loading()
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> Iterable:
        self._prepare_loading()
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Left-padded prompt-only batches of the ``predict`` split (see :mod:`ulma_lightning.data.prompts`),
        or padded full samples when ``predict_inputs`` is ``sequences``."""
        prompts = isinstance(self.datasets["predict"], PromptDataset)
        return self._loader("predict", shuffle=False, collate_fn=self.prompt_collator if prompts else None)

    # ------------------------------------------------------------ prompts for generation
    def prompt_dataset(self, split: str, limit: int | None = None) -> PromptDataset:
        """Prompt-only items of a split that :meth:`setup` built (one per record), for generation."""
        if split not in self.examples:
            raise ValueError(f"the {split} split is not set up (have: {sorted(self.examples)}); call setup() first")
        examples = self.examples[split]
        items = encode_prompts(self.tokenizer, examples, self.max_prompt_length)
        if not items:
            raise ValueError(f"the {split} split has no prompts to generate for")
        return PromptDataset(items[:limit] if limit is not None else items)

    @property
    def prompt_collator(self) -> LeftPaddingCollator:
        return LeftPaddingCollator(self.collator.pad_token_id)

    # ------------------------------------------------------------ precomputed columns
    def set_column(self, split: str, name: str, values: torch.Tensor) -> None:
        """Attach a per-sample column (e.g. ``reference_logps``) to a split; saved in checkpoints."""
        self.datasets[split].extra[name] = values.detach().cpu()

    def has_column(self, split: str, name: str) -> bool:
        return split in self.datasets and name in self.datasets[split].extra

    def state_dict(self) -> dict[str, Any]:
        return {"extra": {split: dict(ds.extra) for split, ds in self.datasets.items() if ds.extra}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for split, columns in state_dict.get("extra", {}).items():
            if split in self.datasets:
                self.datasets[split].extra.update(columns)
            else:
                self._pending_extra[split] = dict(columns)


class PointwiseDataModule(AlignmentDataModule):
    """Point-wise feedback ``{prompt, completion, score}`` (or ``response``) for point-wise DPO and ULMA.

    Unpaired preference ``{prompt, completion, label}`` (KTO's format) gives ``label`` as the binary
    score. Preference pairs ``{prompt, chosen, rejected}``, with implicit prompt ``{chosen, rejected}``
    (conversations) and HH transcripts become two samples each, chosen with score 1 and rejected with
    score 0, as in the paper. Prompt-completion and language-modeling records (``{messages}``,
    ``{text}``) carry no score: they take their source's ``score`` (``1.0`` makes a demonstration set
    positives, see :mod:`ulma_lightning.data.mixing`), or are bad records. Each format is read in the
    standard and the conversational form (see :mod:`ulma_lightning.data.records`). Each sample carries
    ``prompt_id``, equal for the samples of a split that answer the same prompt (before truncation,
    which may cut one prompt differently for two responses); KTO's mismatched pairs read it. A point-wise
    HH transcript ``{transcript, score}`` is split at its last assistant turn: HH's red-team attempts
    are read with ``columns: {score: rating}``, ``score_range: [0, 4]`` and ``score_direction:
    lower_is_better`` (the rating is the red-teamer's success, so harmlessness is ``1 - rating / 4``).

    Args:
        score_range: the declared range of ``score``; scores are normalised to ``[0, 1]`` and a score
            outside the range is a bad record.
        score_direction: ``higher_is_better`` (a score at the top of ``score_range`` becomes 1) or
            ``lower_is_better`` (it becomes 0: the normalised score ``s`` is used as ``1 - s``).
        **kwargs: see :class:`AlignmentDataModule`.
    """

    scored_options = ("score", "score_range")

    def __init__(
        self,
        *args: Any,
        score_range: tuple[float, float] = (0.0, 1.0),
        score_direction: ScoreDirection = "higher_is_better",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if score_range[0] >= score_range[1]:
            raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
        check_choices(score_direction=(score_direction, get_args(ScoreDirection)))
        self.score_range = tuple(score_range)
        self.score_direction = score_direction

    def parse_record(self, record: dict[str, Any], location: Location) -> list[Example]:
        score_range = self.option("score_range")
        default_score = self.reading.score if self.reading is not None else None
        examples = parse_pointwise(
            record, location, score_range, self.score_direction == "lower_is_better", default_score
        )
        if self.label_type == "binary" and any(e.score not in (0.0, 1.0) for e in examples):
            low, high = score_range
            value = (
                f"{record['score']!r}"
                if record.get("score") is not None
                else f"the source's default score {default_score!r}"
            )
            raise DataError(
                location,
                "score",
                f"{value} is neither {low:g} nor {high:g}, and the method's label_type is binary",
                "fix the record, set on_bad_record: skip to skip such records, or train with label_type: continuous",
            )
        return examples

    def build_features(self, examples: list[Example], report: SkipReport) -> list[dict[str, Any]]:
        encoded = self.encode_examples([e.prompt for e in examples], [e.response for e in examples])
        prompt_ids: dict[str, int] = {}
        items = []
        for example, sequence in zip(examples, encoded):
            if sequence is None:
                report.add("no response tokens left after truncation to max_length", str(example.location))
                continue
            input_ids, labels = sequence
            prompt = example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt, sort_keys=True)
            prompt_id = prompt_ids.setdefault(prompt, len(prompt_ids))
            items.append(
                {
                    "input_ids": input_ids,
                    "labels": labels,
                    "score": example.score,
                    "length": len(input_ids),
                    "prompt_id": prompt_id,
                }
            )
        return items
