"""Alignment objectives as pure functions of per-sequence log-probabilities.

Every loss takes tensors of shape ``(B,)`` and returns a :class:`LossOutput` whose ``.loss`` is the
scalar to backpropagate and whose ``.metrics`` holds detached scalars for logging. Notation (Cai et
al., "ULMA", arXiv 2312.02554, section 3):

* ``h = log pi(y|x) - log pi_ref(y|x)``, the implicit reward before scaling;
* ``u = beta * h + offset``, where ``offset`` stands for ``beta * log Z(x)`` (the authors'
  ``constant_zx``, 0 by default);
* ``z`` the label: ``1`` for a positive (desirable) sample, ``0`` for a negative one, or a soft label
  in ``[0, 1]``.

Reductions. ``"subset_mean"`` (the authors' code, ``llmtuner/tuner/ulma/trainer.py``) returns the
mean loss over positives plus the mean loss over negatives; ``"mean"`` returns the mean of all
per-sample losses. An empty subset contributes exactly ``0`` (never NaN, in the loss or its
gradient). A sample is *positive* when ``score >= positive_threshold`` (1.0 by default, which is the
authors' ``score == 1`` for labels in ``[0, 1]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ulma_lightning.choices import check_choices

LabelType = Literal["binary", "continuous"]
ContinuousForm = Literal["bce", "mse"]
Reduction = Literal["subset_mean", "mean"]
PositiveTerm = Literal["sft", "beta_sft", "pointwise_dpo"]
DPOLossType = Literal["sigmoid", "ipo", "hinge"]
UnlikelihoodVariant = Literal["welleck", "authors"]
UnlikelihoodReduction = Literal["token", "subset_mean", "mean"]
RewardForm = Literal["bce", "mse"]

__all__ = [
    "LossOutput",
    "sft_loss",
    "pointwise_dpo_loss",
    "ulma_loss",
    "dpo_loss",
    "kto_loss",
    "unlikelihood_loss",
    "bradley_terry_loss",
    "pointwise_reward_loss",
    "log1m_exp",
    "masked_mean",
    "subset_counts",
    "reduce_losses",
    "pointwise_metrics",
    "pointwise_output",
    "pairwise_output",
]


@dataclass
class LossOutput:
    """What every loss returns.

    Attributes:
        loss: the scalar to backpropagate.
        metrics: detached scalars, keyed by metric name without the ``train/`` prefix.
        losses: per-sample losses, shape ``(B,)`` (before the reduction), detached.
        rewards: per-sample implicit rewards ``beta * h`` where defined (NaN elsewhere), detached.
        counts: for metrics that average over a subset of the batch (``logps/positive``, ...), the
            subset's size: the weight of this batch in the metric's epoch mean, so that a batch
            with few (or no) positives does not pull it toward its value (or toward 0). Metrics
            without a count weigh by the batch size.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    losses: Tensor | None = None
    rewards: Tensor | None = None
    counts: dict[str, Tensor] = field(default_factory=dict)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds; exactly 0 (with a zero gradient) for an empty mask.

    Masked-out entries may be NaN or inf: they are replaced before the sum, so they reach neither the
    result nor the gradient.
    """
    mask = mask.to(torch.bool)
    safe = torch.where(mask, values, torch.zeros_like(values))
    return safe.sum() / mask.sum().clamp(min=1)


def subset_counts(
    positive: Tensor, reduction: str = "subset_mean", rewarded: Tensor | None = None
) -> dict[str, Tensor]:
    """Sizes of the subsets that the ``*/positive`` and ``*/negative`` metrics average over (see
    :attr:`LossOutput.counts`): ``logps`` over all rows of a class, ``rewards`` over those where a
    reward is defined (``rewarded``, default all), ``loss`` over the class under ``subset_mean`` (under
    ``mean`` the parts are shares of the batch mean, weighed by the batch size)."""
    negative = ~positive
    rewarded = torch.ones_like(positive) if rewarded is None else rewarded
    counts = {
        "logps/positive": positive.sum(),
        "logps/negative": negative.sum(),
        "rewards/positive": (positive & rewarded).sum(),
        "rewards/negative": (negative & rewarded).sum(),
    }
    if reduction == "subset_mean":
        counts["loss/positive"], counts["loss/negative"] = positive.sum(), negative.sum()
    return counts


def reduce_losses(
    losses: Tensor, positive: Tensor, reduction: Reduction = "subset_mean"
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce per-sample ``losses`` ``(B,)``; return ``(loss, positive part, negative part)``.

    ``positive`` ``(B,)`` marks the positive rows. ``"subset_mean"``: the mean over positives plus the
    mean over negatives (an empty subset contributes exactly 0, with a zero gradient); ``"mean"``: the
    mean over all rows, split into the positives' and the negatives' shares of it.
    """
    check_choices(reduction=(reduction, get_args(Reduction)))
    pos_part = masked_mean(losses, positive)
    neg_part = masked_mean(losses, ~positive)
    if reduction == "subset_mean":
        return pos_part + neg_part, pos_part, neg_part
    n = losses.numel()
    pos_sum = torch.where(positive, losses, torch.zeros_like(losses)).sum()
    neg_sum = torch.where(~positive, losses, torch.zeros_like(losses)).sum()
    return (pos_sum + neg_sum) / max(n, 1), pos_sum / max(n, 1), neg_sum / max(n, 1)


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {shapes}")


def _check_labels(scores: Tensor, label_type: LabelType) -> None:
    check_choices(label_type=(label_type, get_args(LabelType)))
    if label_type == "binary" and not torch.all((scores == 0) | (scores == 1)):
        raise ValueError("label_type='binary' needs scores in {0, 1}; use label_type='continuous' for soft labels")
    if label_type == "continuous" and not torch.all((scores >= 0) & (scores <= 1)):
        raise ValueError("label_type='continuous' needs scores in [0, 1]; normalise them in the data module")


def _pointwise_terms(
    u: Tensor, scores: Tensor, label_type: LabelType, continuous_form: ContinuousForm
) -> tuple[Tensor, Tensor]:
    """Per-sample point-wise DPO losses as (loss if treated as positive, loss as negative/soft)."""
    check_choices(
        continuous_form=(continuous_form, get_args(ContinuousForm))
    )  # checked for binary labels too: a typo must not pass silently
    positive_loss = -F.logsigmoid(u)  # -log sigma(u)
    if label_type == "binary":
        other_loss = -F.logsigmoid(-u)  # -log(1 - sigma(u)), for z = 0
    elif continuous_form == "bce":
        # soft-label cross-entropy -[z log sigma(u) + (1 - z) log(1 - sigma(u))]
        other_loss = -(scores * F.logsigmoid(u) + (1 - scores) * F.logsigmoid(-u))
    else:
        other_loss = (scores - u).square()  # mse: the authors' regression (z - u)^2
    return positive_loss, other_loss


def pointwise_metrics(
    positive: Tensor,
    pos_part: Tensor,
    neg_part: Tensor,
    rewards: Tensor | None,
    policy_logps: Tensor,
    reduction: Reduction,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The point-wise losses' metrics and their subset sizes (see :attr:`LossOutput.counts`).

    ``loss/positive``, ``loss/negative`` (the parts :func:`reduce_losses` returned),
    ``logps/positive``, ``logps/negative``, ``positive_fraction`` and, when ``rewards`` is given,
    ``rewards/positive`` and ``rewards/negative`` (each over the rows where the reward is defined,
    not NaN).
    """
    metrics = {
        "loss/positive": pos_part.detach(),
        "loss/negative": neg_part.detach(),
        "logps/positive": masked_mean(policy_logps.detach(), positive),
        "logps/negative": masked_mean(policy_logps.detach(), ~positive),
        "positive_fraction": positive.float().mean(),
    }
    rewarded = None
    if rewards is not None:
        rewarded = ~rewards.isnan()
        metrics["rewards/positive"] = masked_mean(rewards.detach(), positive & rewarded)
        metrics["rewards/negative"] = masked_mean(rewards.detach(), ~positive & rewarded)
    return metrics, subset_counts(positive, reduction, rewarded)


def pointwise_output(
    losses: Tensor,
    positive: Tensor,
    policy_logps: Tensor,
    *,
    reduction: Reduction = "subset_mean",
    rewards: Tensor | None = None,
) -> LossOutput:
    """The :class:`LossOutput` of a point-wise loss from its per-sample ``losses`` ``(B,)``.

    The public way to write a new point-wise objective: compute one loss per sample, then hand them
    here with ``positive`` (``(B,)`` bool, the rows counted as positives), the policy's per-sequence
    log-probs and, if the loss has one, the per-sample implicit reward (NaN where undefined). The
    result is reduced by ``reduction`` (:func:`reduce_losses`) and carries the standard metrics and
    their subset counts (:func:`pointwise_metrics`), so the module logs it like the built-in losses::

        def my_loss(policy_logps, reference_logps, scores, *, beta=0.1):
            positive = scores >= 1.0
            losses = torch.where(positive, -policy_logps, -F.logsigmoid(-beta * (policy_logps - reference_logps)))
            return pointwise_output(losses, positive, policy_logps, rewards=beta * (policy_logps - reference_logps))
    """
    loss, pos_part, neg_part = reduce_losses(losses, positive, reduction)
    rewards = None if rewards is None else rewards.detach()
    metrics, counts = pointwise_metrics(positive, pos_part, neg_part, rewards, policy_logps, reduction)
    return LossOutput(loss=loss, metrics=metrics, losses=losses.detach(), rewards=rewards, counts=counts)


def sft_loss(policy_logps: Tensor) -> LossOutput:
    """Negative log-likelihood of demonstrations: ``mean(-log pi(y|x))``.

    With per-token-mean log-probs this is the usual token-averaged cross-entropy per sequence.
    """
    losses = -policy_logps
    loss = losses.mean()
    return LossOutput(loss=loss, metrics={"logps/positive": policy_logps.detach().mean()}, losses=losses.detach())


def pointwise_dpo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    scores: Tensor,
    *,
    beta: float = 0.1,
    offset: float = 0.0,
    label_type: LabelType = "binary",
    continuous_form: ContinuousForm = "bce",
    reduction: Reduction = "subset_mean",
    positive_threshold: float = 1.0,
) -> LossOutput:
    """Point-wise DPO (ULMA paper, eq. 7 and its continuous-label form).

    Binary labels ``z in {0, 1}``::

        l = -[z log sigma(u) + (1 - z) log(1 - sigma(u))],   u = beta * h + offset

    Continuous labels ``z in [0, 1]``: ``continuous_form="bce"`` uses the same cross-entropy with a
    soft label for every sample that is not a positive (``z < 1``); ``"mse"`` regresses
    ``(z - u)^2`` on those samples, as the authors' code does. Positives (``z >= positive_threshold``,
    ``z == 1`` by default) always get ``-log sigma(u)``.

    Gradients (paper, section 3.2): a positive gets ``-beta * sigma(-u) * grad log pi`` (an SFT
    gradient damped as ``pi`` rises above ``pi_ref``); a binary negative gets
    ``+beta * sigma(u) * grad log pi``, bounded by ``beta``.
    """
    _check_shapes(policy_logps=policy_logps, reference_logps=reference_logps, scores=scores)
    scores = scores.to(policy_logps.dtype)
    _check_labels(scores, label_type)
    positive = scores >= positive_threshold
    h = policy_logps - reference_logps
    u = beta * h + offset
    positive_loss, other_loss = _pointwise_terms(u, scores, label_type, continuous_form)
    losses = torch.where(positive, positive_loss, other_loss)
    return pointwise_output(losses, positive, policy_logps, reduction=reduction, rewards=beta * h)


def ulma_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    scores: Tensor,
    *,
    beta: float = 0.1,
    offset: float = 0.0,
    positive_term: PositiveTerm = "sft",
    positive_threshold: float = 1.0,
    label_type: LabelType = "binary",
    continuous_form: ContinuousForm = "bce",
    reduction: Reduction = "subset_mean",
) -> LossOutput:
    """ULMA: SFT on positive demonstrations, point-wise DPO on the rest (ULMA paper, eq. 9).

    For a positive (``score >= positive_threshold``) the loss is chosen by ``positive_term``:

    * ``"sft"`` (default, the paper): ``-log pi(y|x)``; no reference term, so
      ``reference_logps`` may be NaN there;
    * ``"beta_sft"``: ``-beta * log pi(y|x)`` (the authors' ``beta_logloss``);
    * ``"pointwise_dpo"``: ``-log sigma(u)``, which makes ULMA point-wise DPO.

    Every other sample gets the point-wise DPO negative term: ``-log(1 - sigma(u))`` for binary
    labels, or for continuous ones the soft-label cross-entropy (``"bce"``) or the authors'
    ``(z - u)^2`` (``"mse"``). ``u = beta * (log pi - log pi_ref) + offset``.

    With ``reduction="subset_mean"``, ``continuous_form="mse"``, ``offset=0`` and per-token-mean
    log-probs this equals the authors' ``ULMATrainer.ulma_loss`` (``llmtuner/tuner/ulma/trainer.py``).
    """
    check_choices(positive_term=(positive_term, get_args(PositiveTerm)))
    _check_shapes(policy_logps=policy_logps, reference_logps=reference_logps, scores=scores)
    scores = scores.to(policy_logps.dtype)
    _check_labels(scores, label_type)
    positive = scores >= positive_threshold
    # The reference is unused on positives unless the positive term needs it: mask NaNs there.
    needs_reference_on_positives = positive_term == "pointwise_dpo"
    if needs_reference_on_positives:
        ref = reference_logps
    else:
        ref = torch.where(positive, policy_logps.detach(), reference_logps)
    h = policy_logps - ref
    u = beta * h + offset
    dpo_positive, other_loss = _pointwise_terms(u, scores, label_type, continuous_form)
    if positive_term == "sft":
        positive_loss = -policy_logps
    elif positive_term == "beta_sft":
        positive_loss = -beta * policy_logps
    else:  # pointwise_dpo
        positive_loss = dpo_positive
    losses = torch.where(positive, positive_loss, other_loss)
    # Rewards wherever a reference value was given (NaN where the reference was skipped).
    out = pointwise_output(
        losses, positive, policy_logps, reduction=reduction, rewards=beta * (policy_logps - reference_logps)
    )
    if bool((positive & reference_logps.isnan()).any()):
        del out.metrics["rewards/positive"]  # undefined: the reference was skipped on positives
    return out


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Pairwise DPO (Rafailov et al. 2023) and two variants, matching TRL's ``DPOTrainer``.

    With ``m = (log pi_c - log ref_c) - (log pi_r - log ref_r)``:

    * ``"sigmoid"``: ``-(1 - eps) log sigma(beta m) - eps log sigma(-beta m)`` (conservative DPO,
      ``eps = label_smoothing``);
    * ``"ipo"``: ``(m - 1 / (2 beta))^2`` (Azar et al. 2023; log-probs should be per-token means);
    * ``"hinge"``: ``relu(1 - beta m)`` (SLiC, Zhao et al. 2023).
    """
    check_choices(loss_type=(loss_type, get_args(DPOLossType)))
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)).square()
    else:  # hinge
        losses = torch.relu(1 - beta * margin)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    return pairwise_output(losses, policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards)


def pairwise_output(
    losses: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
) -> LossOutput:
    """The :class:`LossOutput` of a pairwise loss from its per-pair ``losses`` ``(B,)``: the mean loss
    and the pairwise metrics (``rewards/positive`` for the chosen side, ``rewards/negative``,
    ``rewards/margin``, ``rewards/accuracy``, ``logps/positive``, ``logps/negative``). The public way
    to write a new pairwise objective (see docs/extending.md); ``rewards`` of the output is the
    per-pair reward margin."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        # one vocabulary across methods: the chosen side is the positive, the rejected the negative
        "rewards/positive": chosen_rewards.mean(),
        "rewards/negative": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/positive": policy_chosen_logps.detach().mean(),
        "logps/negative": policy_rejected_logps.detach().mean(),
    }
    return LossOutput(
        loss=losses.mean(), metrics=metrics, losses=losses.detach(), rewards=chosen_rewards - rejected_rewards
    )


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl_policy_logps: Tensor,
    kl_reference_logps: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024), matching TRL's ``KTOTrainer`` (``loss_type="kto"``).

    ``z0 = max(0, mean(kl_policy_logps - kl_reference_logps))``, detached: the KL baseline from
    mismatched (prompt, response) pairs. The caller averages it across processes by passing the
    gathered tensors. With ``r = log pi - log pi_ref``::

        desirable:   w_d * (1 - sigma(beta (r - z0)))
        undesirable: w_u * (1 - sigma(beta (z0 - r)))

    The loss is the mean over all samples of the weighted terms.
    """
    _check_shapes(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
    desirable = labels.to(torch.bool)
    kl = (kl_policy_logps - kl_reference_logps).detach().mean().clamp(min=0)
    r = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = (beta * r).detach()
    metrics = {
        "kl": kl,
        "rewards/positive": masked_mean(rewards, desirable),
        "rewards/negative": masked_mean(rewards, ~desirable),
        "logps/positive": masked_mean(policy_logps.detach(), desirable),
        "logps/negative": masked_mean(policy_logps.detach(), ~desirable),
        "positive_fraction": desirable.float().mean(),
    }
    counts = subset_counts(desirable, "mean")
    return LossOutput(loss=losses.mean(), metrics=metrics, losses=losses.detach(), rewards=rewards, counts=counts)


def log1m_exp(logp: Tensor, eps: float = 1e-6) -> Tensor:
    """``log(1 - exp(logp))``, finite with a finite, non-zero gradient even where ``p`` rounds to 1.

    Computed as ``log(-expm1(logp))`` with ``logp`` capped at ``log(1 - eps)`` in the forward pass
    only (a straight-through clamp): above the cap the value is ``log(eps)`` and the gradient with
    respect to ``logp`` is that at the cap, ``-(1 - eps) / eps``, instead of infinity (or of the zero
    a plain clamp gives). ``eps`` should not be below the float32 resolution of ``p`` near 1
    (about ``1e-7``); log-probs closer to 0 than that carry rounding noise, not information.
    """
    capped = logp - (logp - logp.clamp(max=math.log1p(-eps))).detach()
    return torch.log(-torch.expm1(capped))


def unlikelihood_loss(
    token_logps: Tensor,
    sequence_index: Tensor,
    positive: Tensor,
    *,
    variant: UnlikelihoodVariant = "welleck",
    alpha: float = 1.0,
    reduction: UnlikelihoodReduction = "token",
    eps: float = 1e-6,
) -> LossOutput:
    """Likelihood on positive samples, unlikelihood on negative ones.

    Takes token-level inputs: ``token_logps`` ``(N,)`` holds ``log p(y_t | x, y_<t)`` for every
    response token of the batch, ``sequence_index`` ``(N,)`` the row of each token, ``positive``
    ``(B,)`` which rows are positive (desirable) samples.

    * ``variant="welleck"`` (Welleck et al. 2019, "Neural text generation with unlikelihood
      training", token-level objective): ``-log p(y_t)`` on positive tokens and
      ``-alpha * log(1 - p(y_t))`` on negative tokens (:func:`log1m_exp`, stable for ``p`` near 1).
      The loss is bounded below by 0: pushing a negative token's probability to 0 saturates.
      ``reduction``: ``"token"`` (default) averages over all response tokens of the batch;
      ``"subset_mean"`` is the mean over positive rows plus the mean over negative rows of each row's
      token-mean loss; ``"mean"`` the mean over rows of the token-mean loss.
    * ``variant="authors"`` (the ULMA authors' ``UnlikelihoodTrainer``, ``sft_loss_type="logloss"``,
      ``llmtuner/tuner/unlikelihood/trainer.py``): with ``s_i`` the per-token-mean log-prob of row
      ``i``, ``-mean_pos(s) + alpha * mean_neg(s)``; an empty subset contributes 0. It *lowers the
      log-likelihood* of negatives, not ``log(1 - p)``: the negative term is unbounded below, so the
      loss keeps falling as ``log p(neg) -> -inf`` (train it for a fixed budget). ``reduction`` is
      not used (it is always this subset mean); with ``alpha=1`` it equals the authors' loss.
    """
    check_choices(
        variant=(variant, get_args(UnlikelihoodVariant)), reduction=(reduction, get_args(UnlikelihoodReduction))
    )
    positive = positive.to(torch.bool)
    size = positive.shape[0]
    token_positive = positive[sequence_index]
    counts = torch.bincount(sequence_index, minlength=size).clamp(min=1).to(token_logps.dtype)

    def per_row(values: Tensor) -> Tensor:
        return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, sequence_index, values) / counts

    row_logps = per_row(token_logps)
    if variant == "welleck":
        token_losses = torch.where(token_positive, -token_logps, -alpha * log1m_exp(token_logps, eps))
        row_losses = per_row(token_losses)
        if reduction == "token":
            n = max(token_logps.numel(), 1)
            pos_part = torch.where(token_positive, token_losses, torch.zeros_like(token_losses)).sum() / n
            neg_part = torch.where(~token_positive, token_losses, torch.zeros_like(token_losses)).sum() / n
            loss = pos_part + neg_part
        else:  # subset_mean or mean
            loss, pos_part, neg_part = reduce_losses(row_losses, positive, reduction)
    else:  # authors
        row_losses = torch.where(positive, -row_logps, alpha * row_logps)
        loss, pos_part, neg_part = reduce_losses(row_losses, positive, "subset_mean")
    metrics = {
        "loss/positive": pos_part.detach(),
        "loss/negative": neg_part.detach(),
        "logps/positive": masked_mean(row_logps.detach(), positive),
        "logps/negative": masked_mean(row_logps.detach(), ~positive),
        "positive_fraction": positive.float().mean(),
    }
    counts = subset_counts(positive, "subset_mean" if variant == "authors" else reduction)
    return LossOutput(loss=loss, metrics=metrics, losses=row_losses.detach(), counts=counts)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    """Reward-model loss on pairs (Bradley and Terry 1952; Ouyang et al. 2022):
    ``-log sigma(r_chosen - r_rejected)``, averaged over pairs."""
    _check_shapes(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    metrics = {
        "rewards/accuracy": (margins > 0).float().mean().detach(),
        "rewards/positive": chosen_rewards.detach().mean(),
        "rewards/negative": rejected_rewards.detach().mean(),
        "rewards/margin": margins.detach().mean(),
    }
    return LossOutput(loss=losses.mean(), metrics=metrics, losses=losses.detach(), rewards=margins.detach())


def pointwise_reward_loss(
    rewards: Tensor, scores: Tensor, *, form: RewardForm = "bce", positive_threshold: float = 1.0
) -> LossOutput:
    """Reward-model loss on point-wise scores ``z`` in ``[0, 1]``.

    * ``form="bce"``: the reward is a logit, ``-[z log sigma(r) + (1 - z) log(1 - sigma(r))]``;
    * ``form="mse"``: the reward regresses the score, ``(r - z)^2``.

    ``accuracy`` counts a sample as right when the reward is on the positive side of the decision
    point (``r > 0`` for bce, ``r > 0.5`` for mse) exactly when ``z >= positive_threshold``.
    """
    check_choices(form=(form, get_args(RewardForm)))
    _check_shapes(rewards=rewards, scores=scores)
    scores = scores.to(rewards.dtype)
    if form == "bce":
        losses = F.binary_cross_entropy_with_logits(rewards, scores, reduction="none")
        decision = 0.0
    else:  # mse
        losses = (rewards - scores).square()
        decision = 0.5
    positive = scores >= positive_threshold
    metrics = {
        "rewards/accuracy": ((rewards.detach() > decision) == positive).float().mean(),
        "rewards/positive": masked_mean(rewards.detach(), positive),
        "rewards/negative": masked_mean(rewards.detach(), ~positive),
    }
    counts = subset_counts(positive, "mean")
    return LossOutput(
        loss=losses.mean(), metrics=metrics, losses=losses.detach(), rewards=rewards.detach(), counts=counts
    )
