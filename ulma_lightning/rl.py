"""RLHF pieces as pure functions: KL estimators, whitening, GAE, and the PPO, RLOO and GRPO losses.

Token-level tensors are ``(B, L)`` matrices of response tokens (row ``i``, position ``t`` is the
``t``-th generated token of response ``i``) with a ``mask`` that is 1 on response tokens and 0 on
padding (after EOS, or past the end of a shorter response); prompt tokens never appear in them.
Masked-out entries never reach a result or a gradient. Sources: Schulman et al. 2017 (PPO,
arXiv 1707.06347), Schulman et al. 2016 (GAE, arXiv 1506.02438), Ziegler et al. 2019 (the adaptive KL
controller, arXiv 1909.08593), Ahmadian et al. 2024 (RLOO, arXiv 2402.14740), and TRL: its PPO
trainer (``trl/trainer/ppo_trainer.py`` up to 0.x: GAE loop, whitening, clipped losses) and
``trl/trainer/rloo_trainer.py`` in TRL 1.16 (leave-one-out baseline, sequence-level clipped loss),
Shao et al. 2024 (GRPO, DeepSeekMath, arXiv 2402.03300), Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783)
and ``trl/trainer/grpo_trainer.py`` in TRL 1.16 (group-normalised advantages, token-level clipped loss).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import LossOutput, masked_mean

KLEstimator = Literal["k1", "k3"]
ScaleRewards = Literal["group", "none"]
GRPOLossType = Literal["grpo", "bnpo", "dr_grpo"]

__all__ = [
    "masked_sum",
    "token_mean",
    "masked_whiten",
    "kl_estimate",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ppo_loss",
    "rloo_advantages",
    "rloo_loss",
    "grpo_advantages",
    "grpo_loss",
    "adaptive_kl_coef",
    "explained_variance",
    "to_token_matrix",
]


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set (masked entries may be NaN: they are replaced first)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim)


token_mean = masked_mean
"""Mean over the masked tokens of the whole batch (``sum(v * m) / sum(m)``); 0 for an empty mask:
:func:`ulma_lightning.losses.masked_mean`."""


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(v - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance), 0 elsewhere.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL's PPO trainer
    whitens token rewards (``whiten_rewards``); advantages are whitened with ``shift_mean=True``.
    """
    mask = mask.bool()
    n = mask.sum()
    mean = token_mean(values, mask)
    var = token_mean((values - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def kl_estimate(logps: Tensor, reference_logps: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    ``k1 = log pi - log pi_ref`` (unbiased, may be negative per token); ``k3 = (r - 1) - log r`` with
    ``r = pi_ref / pi`` (unbiased, never negative, lower variance). J. Schulman, "Approximating KL
    divergence" (2020); TRL's ``kl_estimator`` option.
    """
    check_choices(kl_estimator=(estimator, get_args(KLEstimator)))
    log_ratio = logps - reference_logps
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: ``(advantages, returns)``, ``(B, L)``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` = 0 after the last response token),
    ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V`` (Schulman et al. 2016, eq. 16; TRL's
    PPO loop). Rewards and values at masked positions are treated as 0; results there are 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> LossOutput:
    """PPO's clipped surrogate, token-level: ``mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))``
    with ``rho_t = exp(log pi(y_t) - log pi_old(y_t))``, averaged over the masked tokens of the batch
    (Schulman et al. 2017, eq. 7; TRL's ``pg_loss``). Metrics: ``policy/clipfrac`` (share of tokens
    where the clipped term is chosen) and ``policy/approx_kl`` (``0.5 mean (log rho)^2``).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio)))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "policy/clipfrac": token_mean((clipped > unclipped).float(), mask).detach(),
        "policy/approx_kl": (0.5 * token_mean(log_ratio.detach() ** 2, mask)),
    }
    return LossOutput(loss=loss, metrics=metrics)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range_value: float = 0.2
) -> LossOutput:
    """PPO's clipped value loss: ``0.5 mean_t max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``
    over the masked tokens (TRL's ``vf_loss``). Metric: ``value/clipfrac``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return LossOutput(
        loss=loss, metrics={"value/clipfrac": token_mean((loss_clipped > loss_unclipped).float(), mask).detach()}
    )


def ppo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_value: float = 0.2,
    value_coef: float = 0.1,
) -> LossOutput:
    """``policy loss + value_coef * value loss`` (:func:`ppo_policy_loss`, :func:`ppo_value_loss`);
    TRL's PPO defaults ``cliprange = cliprange_value = 0.2``, ``vf_coef = 0.1``."""
    policy = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=clip_range)
    value = ppo_value_loss(values, old_values, returns, mask, clip_range_value=clip_range_value)
    metrics = {
        "policy/loss": policy.loss.detach(),
        "value/loss": value.loss.detach(),
        **policy.metrics,
        **value.metrics,
    }
    return LossOutput(loss=policy.loss + value_coef * value.loss, metrics=metrics)


def rloo_advantages(rewards: Tensor, k: int, *, normalize: bool = False) -> Tensor:
    """Leave-one-out advantages ``A_i = r_i - mean_{j != i} r_j`` within each group of ``k`` samples of
    one prompt (consecutive rows), Ahmadian et al. 2024, eq. 7; TRL 1.16's RLOO trainer. With
    ``normalize``, ``(A - mean A) / (std A + 1e-4)`` over the batch (unbiased std), as TRL's
    ``normalize_advantages``."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt for a leave-one-out baseline, got {k}")
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of k={k}")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return advantages


def rloo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
) -> LossOutput:
    """REINFORCE with a leave-one-out baseline, sequence level, with PPO-style clipping of the
    sequence ratio ``rho = exp(log pi(y|x) - log pi_old(y|x))`` (summed log-probs):
    ``mean_i -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i)`` (TRL 1.16's RLOO loss). On the
    first update after generation ``rho = 1`` and the gradient is ``-mean_i A_i grad log pi(y_i|x_i)``,
    the RLOO estimator of Ahmadian et al. 2024. Metric: ``policy/clipfrac``."""
    high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + high) * advantages
    losses = -torch.minimum(unclipped, clipped)
    clipped_rows = ((ratio < 1.0 - clip_range) & (advantages < 0)) | ((ratio > 1.0 + high) & (advantages > 0))
    metrics = {
        "policy/clipfrac": clipped_rows.float().mean().detach(),
        "policy/approx_kl": (0.5 * (logps - old_logps).detach() ** 2).mean(),
    }
    return LossOutput(loss=losses.mean(), metrics=metrics, losses=losses.detach())


def grpo_advantages(rewards: Tensor, k: int, *, scale_rewards: ScaleRewards = "group") -> Tensor:
    """Group-relative advantages: ``A_i = r_i - mean(r_group)`` over the ``k`` samples of one prompt
    (consecutive rows); with ``scale_rewards="group"`` divided by ``std(r_group) + 1e-4`` (unbiased std),
    Shao et al. 2024, eq. 3 (outcome supervision); ``"none"``: the mean only, as Dr. GRPO (Liu et al.
    2025) recommends (the std favours prompts whose rewards barely vary: a difficulty bias). TRL 1.16's
    ``GRPOTrainer`` (``scale_rewards``, its advantage lines). A group of equal rewards gets 0."""
    if k < 2:
        raise ValueError(f"GRPO needs k >= 2 samples per prompt for a group baseline, got {k}")
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards are not whole groups of k={k}")
    check_choices(scale_rewards=(scale_rewards, get_args(ScaleRewards)))
    grouped = rewards.view(-1, k)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    reference_logps: Tensor | None = None,
    *,
    beta: float = 0.0,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    loss_type: GRPOLossType = "grpo",
    max_completion_length: int | None = None,
) -> LossOutput:
    """GRPO's clipped surrogate with a KL penalty, token level (Shao et al. 2024, eq. 3; TRL 1.16's
    ``GRPOTrainer._compute_loss``). ``logps``, ``old_logps``, ``reference_logps``: ``(B, L)`` token
    log-probs; ``advantages``: ``(B,)``, one per response (:func:`grpo_advantages`). Per token
    ``l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta * k3_t`` with
    ``rho_t = exp(log pi(y_t) - log pi_old(y_t))`` and ``k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1``
    (:func:`kl_estimate` ``k3``, in the loss with its gradient, not in the reward). Averaging, TRL's names:

    - ``grpo``: mean over each response's tokens, then over responses (the paper). A token of a long
      response weighs less than one of a short response: for ``A > 0`` short answers gain more, for
      ``A < 0`` long wrong answers are penalised less, so lengths of wrong answers grow (Liu et al. 2025).
    - ``bnpo``: sum over the batch's tokens / their number: every token weighs the same.
    - ``dr_grpo``: sum over the batch's tokens / (``B * max_completion_length``), a constant: no
      length bias (Liu et al. 2025, Dr. GRPO).

    Metrics: ``policy/clipfrac`` (share of tokens whose ratio is clipped in the direction of ``A``,
    TRL's ``clip_ratio/region_mean``), ``policy/approx_kl`` and, with a reference, ``policy/kl`` (mean
    ``k3`` per token). ``losses``: each response's mean token loss."""
    check_choices(loss_type=(loss_type, get_args(GRPOLossType)))
    if beta != 0.0 and reference_logps is None:
        raise ValueError(f"grpo_loss with beta={beta} needs reference_logps")
    keep = mask.bool()
    high = clip_range if clip_range_high is None else clip_range_high
    logps = torch.where(keep, logps, torch.zeros_like(logps))  # masked entries may be NaN: none reaches a gradient
    log_ratio = torch.where(keep, logps - old_logps, torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_range, 1.0 + high) * adv)
    metrics: dict[str, Tensor] = {}
    if reference_logps is not None:
        kl = kl_estimate(logps, torch.where(keep, reference_logps, logps), "k3")  # 0 at masked entries
        metrics["policy/kl"] = token_mean(kl.detach(), keep)
        if beta != 0.0:
            per_token = per_token + beta * kl
    weights = keep.to(per_token.dtype)
    per_sequence = masked_sum(per_token, keep, dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if loss_type == "grpo":
        loss = per_sequence.mean()
    elif loss_type == "bnpo":
        loss = masked_sum(per_token, keep) / weights.sum().clamp(min=1.0)
    else:
        if max_completion_length is None:
            raise ValueError(
                "loss_type 'dr_grpo' divides by max_completion_length: pass it (the rollouts' max_new_tokens)"
            )
        loss = masked_sum(per_token, keep) / (per_token.shape[0] * max_completion_length)
    clipped = ((ratio < 1.0 - clip_range) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    metrics["policy/clipfrac"] = token_mean(clipped.float(), keep).detach()
    metrics["policy/approx_kl"] = 0.5 * token_mean(log_ratio.detach() ** 2, keep)
    return LossOutput(loss=loss, metrics=metrics, losses=per_sequence.detach())


def adaptive_kl_coef(coef: float, current_kl: float, *, target: float, horizon: int, steps: int) -> float:
    """Ziegler et al. 2019's adaptive KL controller:
    ``coef * (1 + clip(KL / target - 1, -0.2, 0.2) * steps / horizon)``."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * steps / horizon)


def explained_variance(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(targets - predictions) / Var(targets)`` over the masked tokens (1 is perfect)."""
    var_targets = token_mean((targets - token_mean(targets, mask)) ** 2, mask)
    residual = targets - predictions
    var_residual = token_mean((residual - token_mean(residual, mask)) ** 2, mask)
    return 1.0 - var_residual / var_targets.clamp(min=1e-12)


def to_token_matrix(
    values: Tensor, batch_index: Tensor, num_rows: int, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(B, L)`` matrix and mask from flat row-major per-token values (``TokenLogps`` order); the
    gradient flows back to ``values``."""
    counts = torch.bincount(batch_index, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(values.shape[0], device=values.device) - starts[batch_index]
    width = int(counts.max()) if width is None and values.numel() else (width or 0)
    matrix = values.new_zeros(num_rows, width).index_put((batch_index, position), values)
    mask = torch.arange(width, device=values.device)[None, :] < counts[:, None]
    return matrix, mask
