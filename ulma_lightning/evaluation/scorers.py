"""Scorers: a number per (prompt, response), higher is better. Chosen in the config by ``class_path``.

* :class:`DemoScorer`: the built-in demo task's ground truth
  (:func:`ulma_lightning.data.demo.score_response`), in ``[0, 1]``.
* :class:`TaskScorer`: the comparison task's ground truth
  (:func:`ulma_lightning.data.task.score_response`), in ``[0, 1]``.
* :class:`HFClassifierScorer`: any local Hugging Face sequence-classification folder with one
  label (``AutoModelForSequenceClassification``), e.g. a reward model exported with ``ulma export``.
* :class:`RewardModelScorer`: a ``RewardModelModule`` checkpoint (``.ckpt``) trained with this
  library; it scores through the module's own ``score(prompts, responses, batch_size)``.

The reward models are loaded on first use (so a config that names one costs nothing until a
prediction is scored) and run without gradients, in eval mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ulma_lightning.choices import check_choices
from ulma_lightning.data.features import scoring_batches
from ulma_lightning.importing import import_object

log = logging.getLogger(__name__)


class Scorer:
    """Base class: subclasses implement :meth:`score`; :attr:`name` keys the score in outputs.

    Args:
        name: the key of this scorer's scores in predictions files and reports.
    """

    def __init__(self, name: str = "score") -> None:
        self.name = name

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response); ``prompts`` are strings or chat message lists."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Scorer:
        """Move any model this scorer holds (no-op for programmatic scorers)."""
        return self

    def applies_to(self, sources: Sequence[str | None]) -> bool:
        """Whether this scorer is meant for data from ``sources`` (the training data and the scored
        split's); every scorer but the built-in tasks' ground truths: any data."""
        return True


def scorers_for(scorers: Sequence[Scorer], datamodule: Any, split: str, where: str) -> list[Scorer]:
    """The scorers that apply to ``datamodule``'s training data and ``split``; the others are named
    in a warning and skipped. A data module that does not name its sources keeps them all."""
    if not hasattr(datamodule, "source_of"):
        return list(scorers)
    sources = [datamodule.source_of("train"), datamodule.source_of(split)]
    kept = [s for s in scorers if s.applies_to(sources)]
    for scorer in scorers:
        if scorer not in kept:
            log.warning(
                "%s: scorer %r (%s) skipped: it scores its built-in task only, and the data is %s",
                where,
                scorer.name,
                type(scorer).__name__,
                sources[1],
            )
    return kept


class DemoScorer(Scorer):
    """The demo task's ground-truth score (helpful answers to harmless requests, refusals of harmful ones).

    It runs only when the training data or the scored split is the demo task's (``demo://...``);
    otherwise it is skipped, so the shipped configs score nothing the user did not choose once
    ``data.train`` is their own.

    Args:
        name: the key of the scores in outputs.
    """

    def __init__(self, name: str = "demo") -> None:
        super().__init__(name)

    def applies_to(self, sources: Sequence[str | None]) -> bool:
        """Only where the training data or the scored split is the demo task's (``demo://...``): its
        rules mean nothing for other prompts."""
        from ulma_lightning.data.demo import is_demo_source

        return any(is_demo_source(source) for source in sources)

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        from ulma_lightning.data.demo import score_response

        return [float(score_response(p, r)) for p, r in zip(prompts, responses)]


class TaskScorer(Scorer):
    """The comparison task's ground-truth score (``task://`` data; table in :mod:`ulma_lightning.data.task`).

    Like :class:`DemoScorer`, it runs only when the training data or the scored split is the task's
    (``task://...``).

    Args:
        name: the key of the scores in outputs.
        version: the scorer's version: 2 (default) scores an answer without recognisable words 0 on
            every request; 1 is the table alone (gibberish scored 0.3 on harmful requests).
    """

    def __init__(self, name: str = "task", version: int = 2) -> None:
        super().__init__(name)
        from ulma_lightning.data.task import SCORER_VERSIONS

        check_choices("TaskScorer", version=(version, SCORER_VERSIONS))
        self.version = version

    def applies_to(self, sources: Sequence[str | None]) -> bool:
        """Only where the training data or the scored split is the comparison task's (``task://...``)."""
        return any(source is not None and source.startswith("task://") for source in sources)

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        from ulma_lightning.data.task import score_response

        return [float(score_response(p, r, version=self.version)) for p, r in zip(prompts, responses)]


class _ModelScorer(Scorer):
    """A scorer backed by a model loaded on first use; ``to`` places it unless a device was set."""

    device: torch.device | None = None
    _model: Any = None

    def to(self, device: torch.device | str) -> _ModelScorer:
        if self.device is None:
            self.device = torch.device(device)
            if self._model is not None:
                self._model.to(self.device)
        return self


class HFClassifierScorer(_ModelScorer):
    """A local Hugging Face sequence-classification model with one output (a reward model).

    Sequences are built exactly as the data modules build them (prompt formatted with the folder
    tokenizer's chat template or as HH text, response, EOS; the prompt cut from the left to fit
    ``max_length``), so a reward model trained with this library and exported with ``HFExport`` scores
    as its checkpoint does. The score is the model's single logit.

    Args:
        path: a folder saved with ``save_pretrained`` (model and tokenizer), or a hub id when online.
        name: the key of the scores in outputs.
        batch_size: sequences per forward.
        max_length: tokens per sequence (longer ones are cut from the left, keeping the response).
        device: where to run (default: the device of the model being evaluated, else CPU).
        trust_remote_code: allow model code from the hub.
    """

    def __init__(
        self,
        path: str,
        name: str = "reward",
        batch_size: int = 16,
        max_length: int = 1024,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(name)
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device else None
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(self.path)
        looks_like_hub_id = not local.is_absolute() and not self.path.startswith(".") and self.path.count("/") == 1
        if not local.exists() and not looks_like_hub_id:
            raise FileNotFoundError(
                f"HFClassifierScorer.path: {self.path!r} is not a folder; save the reward model there with "
                "save_pretrained"
            )
        model = AutoModelForSequenceClassification.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        if model.config.num_labels != 1:
            raise ValueError(
                f"HFClassifierScorer.path: {self.path} has num_labels={model.config.num_labels}; a reward model has 1"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self._model = model.eval().to(self.device or "cpu")
        self._tokenizer = tokenizer

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        if self._model is None:
            self._load()
        scores: list[float] = []
        for batch in scoring_batches(self._tokenizer, prompts, responses, self.max_length, self.batch_size):
            logits = self._model(
                input_ids=batch["input_ids"].to(self._model.device),
                attention_mask=batch["attention_mask"].to(self._model.device),
            ).logits
            scores += logits[:, 0].float().tolist()
        return scores


class RewardModelScorer(_ModelScorer):
    """A ``RewardModelModule`` checkpoint trained with ``ulma fit`` (the reward-model config).

    Args:
        ckpt_path: the ``.ckpt`` file.
        name: the key of the scores in outputs.
        batch_size: sequences per forward.
        device: where to run (default: the device of the model being evaluated, else CPU).
        module: the module class, as ``package.module.Class`` (a subclass of your own, for example).
    """

    def __init__(
        self,
        ckpt_path: str,
        name: str = "reward",
        batch_size: int = 16,
        device: str | None = None,
        module: str = "ulma_lightning.modules.reward.RewardModelModule",
    ) -> None:
        super().__init__(name)
        self.ckpt_path = ckpt_path
        self.batch_size = batch_size
        self.device = torch.device(device) if device else None
        self.module = module
        self._model: Any = None

    def _load(self) -> None:
        if not Path(self.ckpt_path).is_file():
            raise FileNotFoundError(f"RewardModelScorer.ckpt_path: no checkpoint at {self.ckpt_path!r}")
        try:
            cls = import_object(self.module)
        except ImportError as exc:
            raise ImportError(f"RewardModelScorer.module: cannot import {self.module!r} ({exc})") from exc
        model = cls.load_from_checkpoint(self.ckpt_path, map_location="cpu", weights_only=False)
        self._model = model.eval().to(self.device or "cpu")

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        if self._model is None:
            self._load()
        values = self._model.score(list(prompts), list(responses), batch_size=self.batch_size)
        return [float(v) for v in torch.as_tensor(values).flatten().tolist()]


def checked_scores(scorer: Scorer, prompts: Sequence[Any], responses: Sequence[str]) -> torch.Tensor:
    """``scorer``'s scores as a float32 ``(B,)`` tensor; stops with an error naming the scorer when it
    returns the wrong number of scores or a non-finite one (NaN, inf)."""
    values = scorer.score(prompts, responses)
    who = f"scorer {type(scorer).__name__} (name {scorer.name!r})"
    if len(values) != len(responses):
        raise ValueError(
            f"{who} returned {len(values)} scores for {len(responses)} responses; Scorer.score must return one number "
            "per (prompt, response), in order"
        )
    scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"{who} returned {values[i]} for response {i} of the batch ({len(bad)} non-finite in all; prompt "
            f"{str(prompts[i])[:80]!r}, response {responses[i][:80]!r}); a scorer must return finite numbers: fix the "
            "scorer or the reward model it loads"
        )
    return scores
