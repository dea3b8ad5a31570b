"""Online ULMA: the policy samples k answers per prompt, a scorer labels each one on its own, and
ULMA (or point-wise DPO) trains on the fresh point-wise labels (docs/online.md)."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import ContinuousForm, LabelType, LossOutput, PositiveTerm, Reduction, ulma_loss
from ulma_lightning.modules.pointwise import check_label_options, check_pointwise_options
from ulma_lightning.modules.rollout import ROLLOUT, Rollout, RolloutModule
from ulma_lightning.modules.shared import REFERENCE_PREFIX, OptimizerConfig
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig, select_rows
from ulma_lightning.rl import kl_estimate

LabelMode = Literal["top_vs_rest", "threshold", "continuous"]
LABEL_MODES = get_args(LabelMode)


def online_labels(
    scores: Tensor,
    k: int,
    mode: LabelMode = "top_vs_rest",
    *,
    threshold: float = 0.5,
    score_range: tuple[float, float] | None = (0.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Point-wise labels from the scores of ``k`` consecutive samples per prompt: ``(labels, kept)``.

    * ``top_vs_rest``: 1 for the samples with the prompt's best score, 0 for the others. Every sample
      tied at the best is a positive; a prompt whose ``k`` scores are all equal says nothing about
      which answer is better: its rows are not kept (``kept`` False, left out of the step).
    * ``threshold``: 1 where ``score >= threshold``, else 0.
    * ``continuous``: ``z = clip((score - lo) / (hi - lo), 0, 1)`` for ``score_range = (lo, hi)`` (the
      scorer's known range: ``(0, 1)`` for ``DemoScorer`` and ``TaskScorer``); with ``score_range``
      null, ``z = sigmoid(score)`` (a reward model's logit read as the Bradley-Terry probability of
      beating an answer of reward 0). ``z == 1`` marks a positive, as in offline ULMA.

    ``kept`` is True on every row except the tied prompts of ``top_vs_rest``.
    """
    check_choices("online_labels", mode=(mode, LABEL_MODES))
    if scores.ndim != 1 or scores.numel() % k:
        raise ValueError(
            f"online_labels: {tuple(scores.shape)} scores are not whole groups of k={k} samples per prompt"
        )
    kept = torch.ones_like(scores, dtype=torch.bool)
    if mode == "top_vs_rest":
        grouped = scores.view(-1, k)
        best = grouped.max(dim=1, keepdim=True).values
        labels = (grouped == best).to(scores.dtype).reshape(-1)
        kept = (best > grouped.min(dim=1, keepdim=True).values).expand_as(grouped).reshape(-1)
    elif mode == "threshold":
        labels = (scores >= threshold).to(scores.dtype)
    elif score_range is None:  # continuous, an unbounded scorer
        labels = torch.sigmoid(scores)
    else:  # continuous, a scorer of known range
        lo, hi = score_range
        labels = ((scores - lo) / (hi - lo)).clamp(0.0, 1.0)
    return labels, kept


class OnlineULMAModule(RolloutModule):
    """Online ULMA: per batch of prompts, ``samples_per_prompt`` (k) responses sampled from the current
    policy (the rollout of :class:`~ulma_lightning.RLOOModule`), each scored by ``scorer`` on its own;
    the scores become point-wise labels (:func:`online_labels`, ``label_mode``) and one ULMA step
    (:func:`~ulma_lightning.losses.ulma_loss`: SFT on positives, the KL-regularised point-wise DPO
    negative term on the others) trains on them, with the start model as the frozen reference.
    ``positive_term: pointwise_dpo`` makes it online point-wise DPO.

    Sequence log-probs are per-token means (``average_logps``), so ``beta`` is on the per-token scale
    of :class:`~ulma_lightning.ULMAModule`. The reference log-probs come from the rollout (no extra
    forward). ``train/kl`` is the mean sequence KL to the reference (``kl_estimator``); ``train/kl_coef``
    logs ``beta``.

    The rollout options (``policy``, ``optimizer``, ``scorer``, ``generation``, ``samples_per_prompt``,
    ``kl_estimator``, ``missing_eos_penalty``, ``reward_clip``, ``max_grad_norm``, ``eval_generation``)
    are :class:`~ulma_lightning.modules.rollout.RolloutModule`'s; the labels are made from the scores
    after its missing-EOS penalty and clipping.

    Args:
        label_mode: ``top_vs_rest`` (the prompt's best sample is positive, the rest negative; needs
            k >= 2; a prompt with k equal scores is left out), ``threshold`` (positive where
            ``score >= threshold``) or ``continuous`` (the score mapped to a soft label in [0, 1] by
            ``score_range``).
        threshold: the score at or above which a sample is positive (``label_mode: threshold``).
        score_range: ``[lo, hi]``, the scorer's range: continuous labels are
            ``clip((score - lo) / (hi - lo), 0, 1)``; null: ``sigmoid(score)`` (for reward-model logits).
        beta: the KL-regularisation strength of the point-wise DPO term (per-token scale).
        offset: added to ``beta * h`` (``beta * log Z(x)``).
        positive_term: ``sft`` (ULMA), ``beta_sft`` or ``pointwise_dpo`` (online point-wise DPO).
        continuous_form: ``bce`` or ``mse``, for continuous labels.
        reduction: ``subset_mean`` (mean over positives + mean over negatives) or ``mean``.
        average_logps: per-token mean sequence log-probs (True) or sums.
        ref_refresh_every: copy the policy into the reference every N optimiser steps (null: the
            start model stays the reference); needs ``policy.reference: copy`` without LoRA.
        num_iterations: optimisation passes over each rollout batch.
        mini_batch_size: rows (responses) per optimiser step (default: the whole rollout batch).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        samples_per_prompt: int = 4,
        label_mode: LabelMode = "top_vs_rest",
        threshold: float = 0.5,
        score_range: tuple[float, float] | None = (0.0, 1.0),
        beta: float = 1.0,
        offset: float = 0.0,
        positive_term: PositiveTerm = "sft",
        continuous_form: ContinuousForm = "bce",
        reduction: Reduction = "subset_mean",
        average_logps: bool = True,
        ref_refresh_every: int | None = None,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "kl_coef" in kwargs:
            raise TypeError("OnlineULMAModule takes beta (the point-wise DPO term's KL strength), not kl_coef")
        check_choices(label_mode=(label_mode, LABEL_MODES), positive_term=(positive_term, get_args(PositiveTerm)))
        check_label_options(label_type="binary", continuous_form=continuous_form)
        check_pointwise_options(beta=beta, positive_threshold=1.0, reduction=reduction)
        check_numbers(
            samples_per_prompt=(samples_per_prompt, ">= 1"),
            ref_refresh_every=(ref_refresh_every, ">= 1"),
            num_iterations=(num_iterations, ">= 1"),
            mini_batch_size=(mini_batch_size, ">= 1"),
        )
        if label_mode == "top_vs_rest" and samples_per_prompt < 2:
            raise ValueError(
                "label_mode top_vs_rest compares the samples of a prompt: samples_per_prompt must be >= 2, got "
                f"{samples_per_prompt}; or use label_mode threshold or continuous"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not lo < hi:
                raise ValueError(
                    f"score_range must be [lo, hi] with lo < hi (the scorer's range), got {list(score_range)}"
                )
            if label_mode == "threshold" and not lo < threshold <= hi:
                raise ValueError(
                    f"threshold must be in (lo, hi] = ({lo}, {hi}] of score_range, got {threshold}: no sample would be "
                    f"{'positive' if threshold > hi else 'negative'}; or set score_range null for an unbounded scorer"
                )
            score_range = (lo, hi)
        if ref_refresh_every is not None and (policy.reference != "copy" or policy.lora is not None):
            raise ValueError(
                "ref_refresh_every copies the policy into a separate reference model: it needs policy.reference copy "
                f"without policy.lora, got reference {policy.reference!r}"
                + (" with lora" if policy.lora is not None else "")
            )
        spec = ROLLOUT.replace(average_logps=average_logps)
        super().__init__(policy, optimizer, samples_per_prompt=samples_per_prompt, kl_coef=beta, _spec=spec, **kwargs)
        self.label_mode, self.threshold, self.score_range = label_mode, float(threshold), score_range
        self.beta, self.offset, self.positive_term = beta, offset, positive_term
        self.continuous_form, self.reduction = continuous_form, reduction
        self.ref_refresh_every = ref_refresh_every
        self.num_iterations, self.mini_batch_size = num_iterations, mini_batch_size

    def labels(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """The rollout's point-wise labels and the rows kept (:func:`online_labels`)."""
        return online_labels(
            self.final_scores(rollout),
            self.samples_per_prompt,
            self.label_mode,
            threshold=self.threshold,
            score_range=self.score_range,
        )

    def update(self, rollout: Rollout) -> dict[str, Tensor | float]:
        mask = rollout.mask
        labels, kept = self.labels(rollout)
        reference = (rollout.reference_logps * mask).sum(dim=1)
        if self.average_logps:
            reference = reference / mask.sum(dim=1).clamp(min=1)
        label_type: LabelType = "continuous" if self.label_mode == "continuous" else "binary"

        def step(rows: Tensor) -> LossOutput:
            chosen = rows[kept[rows]]
            sub = (
                chosen if chosen.numel() else rows[:1]
            )  # every process runs a forward (DDP), even with nothing to learn
            logps = self.policy.token_logps(select_rows(rollout.sequences, sub)).per_sequence(
                average=self.average_logps
            )
            out = ulma_loss(
                logps,
                reference[sub],
                labels[sub],
                beta=self.beta,
                offset=self.offset,
                positive_term=self.positive_term,
                label_type=label_type,
                continuous_form=self.continuous_form,
                reduction=self.reduction,
            )
            if not chosen.numel():  # only tied prompts: a zero step with the same metrics on every process
                return LossOutput(
                    loss=out.loss * 0.0, metrics={name: torch.zeros_like(value) for name, value in out.metrics.items()}
                )
            return out

        before = int(self.global_step)
        metrics: dict[str, Tensor | float] = dict(
            self.minibatch_updates(len(rollout.responses), self.num_iterations, self.mini_batch_size, step)
        )
        positive = (labels >= 1.0) & kept
        metrics.update(
            {
                "kl": (kl_estimate(rollout.logps, rollout.reference_logps, self.kl_estimator) * mask).sum(dim=1).mean(),
                "positive_fraction": positive.float().sum() / kept.float().sum().clamp(min=1),
                "label_mean": (labels * kept).sum() / kept.float().sum().clamp(min=1),
                "kept_fraction": kept.float().mean(),
            }
        )
        every = self.ref_refresh_every
        if every is not None and int(self.global_step) // every > before // every:
            self.refresh_reference()
        return metrics

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """Copy the policy's current weights into the frozen reference (``ref_refresh_every``)."""
        reference, model = self.policy.reference_model, self.policy.model
        assert reference is not None and model is not None  # reference: copy, checked at construction
        reference.load_state_dict(model.state_dict())

    @property
    def checkpoints_reference(self) -> bool:
        """Whether checkpoints hold the reference's weights (with ``ref_refresh_every``; under FSDP2 too)."""
        return self.ref_refresh_every is not None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With ``ref_refresh_every`` the reference is no longer the start model: keep its weights in the
        checkpoint (the base drops them, to rebuild them from their source), so a resumed run has it."""
        state = checkpoint.get("state_dict", {})
        reference: dict[str, Any] = (
            {k: v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
            if self.ref_refresh_every is not None
            else {}
        )
        super().on_save_checkpoint(checkpoint)
        checkpoint.setdefault("state_dict", {}).update(reference)
