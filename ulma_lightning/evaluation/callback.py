"""TensorBoard during training: sample generations, implicit-reward histograms, hyperparameters.

:class:`GenerationSamples` shows what the model now says, not only its loss:

* every ``every_n_steps`` optimizer steps (and at the end of fit), a text table
  ``| prompt | (score) response |`` for a fixed set of validation prompts (``samples/generations``),
  with a warning when responses are empty (``3 of 8 responses are empty``);
* at the end of each validation epoch, histograms of the implicit reward ``beta * h`` of the
  positive and negative samples (``val/rewards/positive_hist``, ``val/rewards/negative_hist``; for
  pairwise methods, whose reward is the chosen-minus-rejected margin, ``val/rewards/margin_hist``);
* the final value of ``hparams_metric`` (``val/loss`` by default) as TensorBoard's ``hp_metric``,
  so the hyperparameters Lightning logs at the start of fit show it in the HPARAMS view.

Only the TensorBoard logger is written to; with another logger, the callback does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import ulma_lightning._compat as _compat
from ulma_lightning.evaluation.generation import (
    GenerationConfig,
    can_generate,
    empty_responses,
    empty_warning,
    generate_responses,
)
from ulma_lightning.evaluation.scorers import Scorer, scorers_for

log = logging.getLogger(__name__)


def _cell(value: Any, limit: int = 300) -> str:
    """A markdown table cell: chat prompts as ``role: content`` lines, pipes and newlines escaped."""
    if isinstance(value, list):
        value = " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.replace("|", "\\|").replace("\n", " ").strip() or " "


def markdown_table(prompts: list[Any], responses: list[str], scores: list[float] | None) -> str:
    """A markdown table TensorBoard's text plugin renders: ``| prompt | response |``, each response
    led by its score in bold when there are scores (``**0.812** ...``). A score column of its own
    would wrap ("sco re"): the plugin lets any word break, so the long columns squeeze a short one."""
    header = "| prompt | response |" if scores is None else "| prompt | (score) response |"
    lines = [header, "|---|---|"]
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        score = "" if scores is None else f"**{scores[i]:.3f}** "
        lines.append(f"| {_cell(prompt)} | {score}{_cell(response)} |")
    return "\n".join(lines)


def logged_step(trainer: pl.Trainer) -> int:
    """The step at which Lightning logs the metrics of now (``val/loss`` of a validation inside fit is
    logged one below ``global_step``): what is written beside them shares their step."""
    return _compat.batches_that_stepped(trainer)


class GenerationSamples(pl.Callback):
    """Sample generations, implicit-reward histograms and the final metric of the hparams view in TensorBoard.

    Args:
        every_n_steps: generate every N optimizer steps (0: only at the end of fit).
        num_prompts: how many validation prompts (the first N, fixed for the whole run).
        generation: decoding settings (greedy by default, so tables are comparable across steps).
        scorer: scores each response in the table (e.g. ``ulma_lightning.evaluation.DemoScorer``,
            which is skipped unless the validation data is the demo task's); none: no score column.
        histograms: log the implicit-reward histograms at the end of each validation epoch.
        hparams_metric: the logged metric reported as ``hp_metric`` in the HPARAMS view (none: off).
        batch_size: prompts per generation batch.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        num_prompts: int = 8,
        generation: GenerationConfig | None = None,
        scorer: Scorer | None = None,
        histograms: bool = True,
        hparams_metric: str | None = "val/loss",
        batch_size: int = 8,
    ) -> None:
        if every_n_steps < 0 or num_prompts < 0 or batch_size < 1:
            raise ValueError("GenerationSamples: every_n_steps and num_prompts must be >= 0, batch_size >= 1")
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.generation = generation or GenerationConfig(max_new_tokens=48)
        self.scorer = scorer
        self._active_scorer = scorer
        self.histograms = histograms
        self.hparams_metric = hparams_metric
        self.batch_size = batch_size
        self._loader: DataLoader | None = None
        self._last_step = -1
        self._rewards: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _tensorboard(trainer: pl.Trainer) -> Any:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _prompts(self, trainer: pl.Trainer) -> DataLoader | None:
        if self._loader is None and self.num_prompts > 0:
            datamodule = trainer.datamodule
            if (
                datamodule is None
                or not hasattr(datamodule, "prompt_dataset")
                or "val" not in getattr(datamodule, "examples", {})
            ):
                return None
            dataset = datamodule.prompt_dataset("val", limit=self.num_prompts)
            self._loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=datamodule.prompt_collator)
        return self._loader

    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Generate for the fixed prompts and write the table at the current global step.

        Rank 0 generates, or, for a sharded policy (FSDP, FSDP2: every forward is collective), every
        process generates for the same prompts in step; rank 0 scores and writes.
        """
        writer = self._tensorboard(trainer)
        loader = self._prompts(trainer)
        policy = getattr(pl_module, "policy", None)
        model = getattr(policy, "model", None)
        synced = bool(getattr(policy, "lockstep", False))
        if writer is None or loader is None or not can_generate(model) or not (trainer.is_global_zero or synced):
            return
        prompts: list[Any] = []
        responses: list[str] = []
        for batch in loader:
            ids, mask = batch["input_ids"].to(pl_module.device), batch["attention_mask"].to(pl_module.device)
            responses += generate_responses(model, pl_module.tokenizer, ids, mask, self.generation, synced=synced)
            prompts += batch["prompt"]
        self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        empty = empty_responses(responses)
        if empty:
            log.warning("%s", empty_warning(f"GenerationSamples at step {trainer.global_step}", empty, len(responses)))
        scores = self._active_scorer.score(prompts, responses) if self._active_scorer is not None else None
        writer.add_text(
            "samples/generations", markdown_table(prompts, responses, scores), global_step=trainer.global_step
        )
        if scores:
            writer.add_scalar("samples/mean_score", sum(scores) / len(scores), global_step=trainer.global_step)

    # ------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(getattr(pl_module, "policy", None), "model", None)
        if not can_generate(model) and self.num_prompts > 0:  # a reward model scores, it does not write
            log.info(
                "GenerationSamples: %s has no generating model (%s); no sample generations are logged",
                type(pl_module).__name__,
                type(model).__name__,
            )
        kept = scorers_for(
            [self.scorer] if self.scorer is not None else [], trainer.datamodule, "val", "GenerationSamples"
        )
        self._active_scorer = kept[0] if kept else None  # the demo's scorer only on demo data
        if self._active_scorer is not None:
            self._active_scorer.to(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)
        writer = self._tensorboard(trainer)
        if writer is not None:
            writer.flush()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rewards = []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.histograms or not isinstance(outputs, dict) or outputs.get("rewards") is None:
            return
        scores = outputs.get("scores")
        self._rewards.append(
            (outputs["rewards"].detach().float().cpu(), None if scores is None else scores.detach().cpu())
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = self._tensorboard(trainer)
        if writer is None or trainer.sanity_checking or not trainer.is_global_zero or not self._rewards:
            return
        threshold = float(getattr(pl_module, "positive_threshold", 1.0))
        groups: dict[str, list[torch.Tensor]] = {}
        for rewards, scores in self._rewards:
            if scores is None or scores.shape != rewards.shape:
                groups.setdefault("margin", []).append(rewards)
                continue
            positive = scores >= threshold
            groups.setdefault("positive", []).append(rewards[positive])
            groups.setdefault("negative", []).append(rewards[~positive])
        for name, parts in groups.items():
            values = torch.cat(parts)
            values = values[~values.isnan()]
            if values.numel():
                writer.add_histogram(f"val/rewards/{name}_hist", values, global_step=logged_step(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hparams_metric is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        value = trainer.callback_metrics.get(self.hparams_metric)
        writer = self._tensorboard(trainer)
        if value is not None and writer is not None:  # at the step Lightning logged the metric itself
            writer.add_scalar("hp_metric", float(value), global_step=logged_step(trainer))
