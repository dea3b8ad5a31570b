"""What a method needs from the shared step, declared once per module: :class:`MethodSpec`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.data.contract import PredictInputs
from ulma_lightning.losses import LabelType

#: rows of a point-wise batch that get a reference forward: every row, the negatives only
#: (``score < positive_threshold``), or none (no reference model is built or run)
ReferenceRows = Literal["all", "negatives", "none"]
REFERENCE_ROWS = ("all", "negatives", "none")
REFERENCE_MODES = ("copy", "adapter", "precomputed")


@dataclass(frozen=True)
class MethodSpec:
    """The declaration of a method: what its module needs, checked once, here.

    A module builds one in its constructor from its options and passes it to
    :class:`~ulma_lightning.modules.base.AlignmentModule`, which validates it against the policy's
    settings and reads it wherever the step, the reference precompute, the data module and ``ulma
    predict`` need to know.

    Args:
        reference: training rows that need reference log-probs (``all``, ``negatives``, ``none``).
        eval_reference: the same for validation and test (default: ``reference``).
        average_logps: per-token mean (True) or summed (False) sequence log-probs, for every
            log-prob of the module (policy, reference, precomputed columns, ``predict``).
        label_type: the labels the loss reads: ``binary`` (scores in {0, 1}, checked by the data
            module), ``continuous`` (scores in [0, 1]) or None (no labels, or any score).
        precomputed_columns: per-sample columns that ``policy.reference: precomputed`` stores.
        predict_inputs: what ``ulma predict`` feeds the module: ``prompts`` (to generate) or
            ``sequences`` (full samples to score).
        perplexity: whether validation and test log the perplexity of demonstrations (a generative
            policy only).
        reward_metrics: whether the step records an implicit reward's accuracy and AUC.
        reference_modes: the ``policy.reference`` modes the method works with.
    """

    reference: ReferenceRows = "all"
    eval_reference: ReferenceRows | None = None
    average_logps: bool = False
    label_type: LabelType | None = None
    precomputed_columns: tuple[str, ...] = ("reference_logps",)
    predict_inputs: PredictInputs = "prompts"
    perplexity: bool = True
    reward_metrics: bool = False
    reference_modes: tuple[str, ...] = REFERENCE_MODES

    def __post_init__(self) -> None:
        check_choices(
            reference=(self.reference, REFERENCE_ROWS),
            eval_reference=(self.eval_reference, (*REFERENCE_ROWS, None)),
            label_type=(self.label_type, (*get_args(LabelType), None)),
            predict_inputs=(self.predict_inputs, get_args(PredictInputs)),
            **{f"reference_modes[{i}]": (mode, REFERENCE_MODES) for i, mode in enumerate(self.reference_modes)},
        )
        if not isinstance(self.average_logps, bool):
            raise ValueError(f"average_logps must be true or false, got {self.average_logps!r}")

    def replace(self, **changes: object) -> MethodSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def needs_reference(self) -> bool:
        """Whether any stage needs reference log-probs."""
        return self.reference != "none" or self.eval_reference not in (None, "none")

    def reference_rows(self, scores: Tensor, stage: str, positive_threshold: float) -> Tensor | None:
        """The rows of a point-wise batch that get a reference forward (None: all of them)."""
        rows = self.reference if stage == "train" or self.eval_reference is None else self.eval_reference
        return scores < positive_threshold if rows == "negatives" else None

    def check_reference_mode(self, mode: str, owner: str) -> None:
        """Refuse a ``policy.reference`` mode the method cannot use (at construction)."""
        if not self.needs_reference or mode in self.reference_modes:
            return
        if "precomputed" not in self.reference_modes:
            raise ValueError(
                f"{owner}: policy.reference (model.init_args.policy.reference) is {mode!r}; use copy (a frozen copy of "
                "the initial policy or policy.reference_model) or adapter (with policy.lora). The reference scores "
                "the policy's own generations, so it cannot be precomputed"
            )
        raise ValueError(
            f"{owner} needs reference log-probs, but policy.reference (model.init_args.policy.reference in a config) "
            f"is {mode!r}; set it to copy (a frozen copy of the initial policy, or policy.reference_model), adapter "
            "(with policy.lora: the policy without its adapters) or precomputed (computed once before training)"
        )
