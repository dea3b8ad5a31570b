"""What a method's module may use of its data module, written down once (:class:`ModuleData`).

Modules reach the trainer's data module for precomputed reference columns, KTO's mismatched pairs,
the learning-rate schedule's length and the scorers that apply to the training data; the data
module learns the method's label type and predict inputs from its constructor, linked by ``ulma``; every data
module of the library (:class:`~ulma_lightning.data.datamodule.AlignmentDataModule`) provides all of
it. A data module of your own that a built-in method trains on provides the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch

#: what a data module's predict split yields: prompts to generate from, or whole sequences to score
PredictInputs = Literal["prompts", "sequences"]


class ModuleData(Protocol):
    """The data module as modules see it.

    Attributes:
        datasets: per split (``train``, ``val``, ``test``), the built dataset; ``.items`` are the
            per-sample feature dicts.
        eval_batch_size: the batch size of evaluation loaders (also used to precompute the reference).
        label_type: the method's labels (its ``MethodSpec.label_type``): ``binary`` refuses other
            scores as bad records; None or ``continuous``: any score.
        predict_inputs: what ``predict`` batches hold (the method's ``MethodSpec.predict_inputs``):
            ``prompts`` or ``sequences``.

    The data module never reads the model: ``ulma`` links ``label_type`` and ``predict_inputs`` from
    the built model's declaration into the data module's constructor arguments of those names.
    """

    datasets: dict[str, Any]
    eval_batch_size: int
    label_type: str | None
    predict_inputs: str

    @property
    def collator(self) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        """Turns a list of feature dicts into a padded batch, as the loaders do."""
        ...

    def setup(self, stage: str | None = None) -> None:
        """Build the splits of ``stage`` (Lightning's hook)."""
        ...

    def has_split(self, split: str) -> bool:
        """Whether ``split`` has a source (it may not be built yet)."""
        ...

    def has_column(self, split: str, name: str) -> bool:
        """Whether every sample of ``split`` carries the per-sample column ``name``."""
        ...

    def set_column(self, split: str, name: str, values: torch.Tensor) -> None:
        """Attach ``values`` (one per sample, in dataset order) to ``split`` as column ``name``; it
        travels in every batch and in the data module's checkpointed state."""
        ...

    def run_before_loading(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once, just before the first data loader is built."""
        ...

    def train_batches_per_epoch(self) -> int:
        """Training batches in one epoch on this process, without building the loader."""
        ...

    def source_of(self, split: str) -> str | None:
        """The source ``split`` reads (None when it has none)."""
        ...
