"""``ulma predict``: generations for the predict split, scored, written as JSONL, summarised.

The CLI adds one :class:`PredictionWriter` to every run; its settings are the config's top-level
``evaluation:`` section. It only acts in ``predict``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ulma_lightning.evaluation.generation import GenerationConfig, empty_responses, empty_warning
from ulma_lightning.evaluation.scorers import Scorer, scorers_for
from ulma_lightning.evaluation.winrate import match_rows, read_predictions, summarize

log = logging.getLogger(__name__)


def _all_gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows on every process (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A small text table: one line per scorer."""
    columns = ("mean", "reference_mean", "win_rate_vs_reference", "other_mean", "win_rate_vs_other")
    shown = [c for c in columns if any(c in stats for stats in summary.values())]
    lines = ["scorer      " + "".join(f"{c:>24}" for c in shown)]
    for name, stats in summary.items():
        cells = "".join(f"{stats.get(c, math.nan):>24.4f}" for c in shown)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


class PredictionWriter(BasePredictionWriter):
    """Generates responses to the predict split, scores them, writes JSONL and a summary JSON.

    Each line of ``output``: ``{index, prompt, response, reference_response, scores: {NAME: x},
    reference_scores: {NAME: y}}``; its path is printed. The summary (``output`` with ``.summary.json``)
    holds the count of empty responses (``empty_responses``; a warning says when there are any) and,
    per scorer, the mean score, the reference responses' mean, the win rate against the reference
    responses and (with ``compare_to``) against another predictions file; ties count half.

    Args:
        output: the JSONL file: a bare file name goes in the run's log folder (default
            ``predictions.jsonl`` there); a path with a folder is used as given.
        generation: decoding settings (greedy by default).
        scorers: scorers by ``class_path`` (e.g. ``ulma_lightning.evaluation.DemoScorer``,
            ``HFClassifierScorer``, ``RewardModelScorer``); none: responses are not scored. A scorer
            that does not apply to the predict data (``DemoScorer`` on data other than ``demo://``)
            is skipped.
        compare_to: another predictions file on the same prompts (e.g. the untrained or a baseline
            model's); its responses are re-scored with the same scorers for ``win_rate_vs_other``.
        score_reference: also score the data set's reference responses (needed for
            ``win_rate_vs_reference``).
    """

    def __init__(
        self,
        output: str | None = None,
        generation: GenerationConfig | None = None,
        scorers: list[Scorer] | None = None,
        compare_to: str | None = None,
        score_reference: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.generation = generation or GenerationConfig()
        self.scorers = list(scorers or [])
        self.active_scorers = list(self.scorers)  # those that apply to this predict's data
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.scorers: each scorer needs its own name, got {names}; set `name:` on each")
        self.compare_to = compare_to
        self.score_reference = score_reference
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, dict[str, float]] = {}
        self.empty = 0  # responses that are empty (counted and warned about in predict)
        self.path: Path | None = None

    def resolve_path(self, trainer: pl.Trainer) -> Path:
        name = Path(self.output or "predictions.jsonl")
        if name.is_absolute() or name.parent != Path("."):
            return name
        root = Path(trainer.log_dir or trainer.default_root_dir) if trainer.loggers else Path(trainer.default_root_dir)
        return root / name

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []
        if hasattr(pl_module, "generation"):
            pl_module.generation = self.generation
        self.active_scorers = scorers_for(
            self.scorers, trainer.datamodule, "predict", "evaluation"
        )  # the demo's only on demo data
        for scorer in self.active_scorers:
            scorer.to(pl_module.device)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, dict) or "response" not in prediction:
            return
        prompts, responses = batch["prompt"], prediction["response"]
        references = batch.get("reference_response") or [None] * len(prompts)
        rows = [
            {
                "index": int(i),
                "prompt": p,
                "response": r,
                "reference_response": ref,
                "scores": {},
                "reference_scores": {},
            }
            for i, p, r, ref in zip(prediction["index"].tolist(), prompts, responses, references)
        ]
        for scorer in self.active_scorers:
            for row, value in zip(rows, scorer.score(prompts, responses)):
                row["scores"][scorer.name] = value
            with_ref = [k for k, row in enumerate(rows) if row["reference_response"] is not None]
            if self.score_reference and with_ref:
                values = scorer.score(
                    [rows[k]["prompt"] for k in with_ref], [rows[k]["reference_response"] for k in with_ref]
                )
                for k, value in zip(with_ref, values):
                    rows[k]["reference_scores"][scorer.name] = value
        self.rows += rows

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = _all_gather_rows(self.rows)
        if not rows:  # the module made no generations (e.g. a reward model scoring samples)
            return
        unique = {row["index"]: row for row in rows}  # a distributed sampler repeats a few rows
        self.rows = [unique[i] for i in sorted(unique)]
        self.path = self.resolve_path(trainer)
        other = self._other_rows() if self.compare_to else None
        self.summary = summarize(self.rows, [s.name for s in self.active_scorers], other)
        self.empty = empty_responses([row["response"] for row in self.rows])
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as handle:
                for row in self.rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary_path = self.path.with_suffix(".summary.json")
            summary = {
                "predictions": str(self.path),
                "compare_to": self.compare_to,
                "scores": self.summary,
                "empty_responses": self.empty,
            }
            summary_path.write_text(json.dumps(summary, indent=2))
            if self.empty:
                log.warning("%s", empty_warning("predict", self.empty, len(self.rows)))
            if self.summary:
                print(format_summary(self.summary))
            print(f"wrote {len(self.rows)} predictions to {self.path}")

    def _other_rows(self) -> list[dict[str, Any]]:
        """The ``compare_to`` rows matching ours by prompt, re-scored with our scorers."""
        assert self.compare_to is not None
        other = match_rows(self.rows, read_predictions(self.compare_to), other_name=self.compare_to)
        for scorer in self.active_scorers:
            values = scorer.score([r["prompt"] for r in other], [r["response"] for r in other])
            for row, value in zip(other, values):
                row.setdefault("scores", {})[scorer.name] = value
        return other
