"""GRPO (Shao et al. 2024, DeepSeekMath): k samples per prompt, advantages relative to the prompt's group; no critic."""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import Tensor

from ulma_lightning.choices import check_choices
from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.rollout import ROLLOUT, Rollout, RolloutModule
from ulma_lightning.modules.shared import OptimizerConfig
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig, select_rows
from ulma_lightning.rl import GRPOLossType, ScaleRewards, grpo_advantages, grpo_loss, kl_estimate, token_mean


class GRPOModule(RolloutModule):
    """GRPO, as TRL 1.16's ``GRPOTrainer``: per prompt ``num_generations`` sampled responses, each
    scored by ``scorer``; advantage ``(score_i - mean of the group) / (std of the group + 1e-4)``
    (:func:`ulma_lightning.rl.grpo_advantages`; ``scale_rewards: none`` keeps the mean only); loss: the
    token-level clipped importance-ratio surrogate plus ``beta`` times the ``k3`` estimate of the KL to
    the reference, in the loss rather than in the reward (:func:`ulma_lightning.rl.grpo_loss`),
    ``num_iterations`` passes over each rollout batch in mini-batches.

    The rollout options (``policy``, ``optimizer``, ``scorer``, ``generation``, ``missing_eos_penalty``,
    ``reward_clip``, ``max_grad_norm``, ``eval_generation``) are
    :class:`~ulma_lightning.modules.rollout.RolloutModule`'s; ``num_generations`` stands for its
    ``samples_per_prompt`` and ``beta`` for its ``kl_coef`` (the estimator is always ``k3``).

    Args:
        num_generations: responses sampled per prompt, the group (>= 2; TRL's ``num_generations``).
        beta: coefficient of the per-token ``k3`` KL penalty to the reference (>= 0). 0: no reference
            model is built or run (``policy.reference`` is then ignored). The paper uses 0.04; TRL 1.16's
            default is 0.
        scale_rewards: ``group`` divides each advantage by its group's reward std (the paper, TRL's
            default); ``none`` only subtracts the group mean (Dr. GRPO: no difficulty bias).
        loss_type: how token losses are averaged: ``grpo`` (per response, then over responses: the
            paper; biased toward short right and long wrong answers), ``bnpo`` (over all tokens of the
            mini-batch) or ``dr_grpo`` (token sum / (responses x ``generation.max_new_tokens``), Dr. GRPO);
            docs/rlhf.md, "GRPO".
        clip_range: lower clip ``epsilon`` of the token ratio (> 0; TRL's ``epsilon``).
        clip_range_high: upper clip (> 0; default: ``clip_range``; TRL's ``epsilon_high``, DAPO uses 0.28).
        num_iterations: optimisation passes over each rollout batch (TRL's ``num_iterations``, the paper's mu).
        mini_batch_size: rows (responses) per optimiser step (default: the whole rollout batch).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        num_generations: int = 4,
        beta: float = 0.04,
        scale_rewards: ScaleRewards = "group",
        loss_type: GRPOLossType = "grpo",
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if num_generations < 2:
            raise ValueError(
                "GRPOModule: num_generations must be >= 2 (the advantage is relative to the prompt's other samples), "
                f"got {num_generations}"
            )
        for name, use in (
            ("samples_per_prompt", "num_generations"),
            ("kl_coef", "beta"),
            ("kl_estimator", "beta (the k3 estimator, always)"),
        ):
            if name in kwargs:
                raise TypeError(f"GRPOModule takes {use}, not {name}")
        check_choices(
            "GRPOModule",
            scale_rewards=(scale_rewards, get_args(ScaleRewards)),
            loss_type=(loss_type, get_args(GRPOLossType)),
        )
        check_numbers(beta=(beta, ">= 0"), clip_range=(clip_range, "> 0"), clip_range_high=(clip_range_high, "> 0"))
        check_numbers(num_iterations=(num_iterations, ">= 1"), mini_batch_size=(mini_batch_size, ">= 1"))
        spec = ROLLOUT.replace(reference="all" if beta else "none")  # beta 0: no reference model is built or run
        super().__init__(
            policy, optimizer, samples_per_prompt=num_generations, kl_coef=beta, kl_estimator="k3", _spec=spec, **kwargs
        )
        self.scale_rewards, self.loss_type = scale_rewards, loss_type
        self.clip_range, self.clip_range_high = clip_range, clip_range_high
        self.num_iterations, self.mini_batch_size = num_iterations, mini_batch_size

    def update(self, rollout: Rollout) -> dict[str, Tensor | float]:
        mask = rollout.mask
        scores = self.final_scores(rollout)
        k = self.samples_per_prompt
        advantages = grpo_advantages(scores, k, scale_rewards=self.scale_rewards)
        reference = rollout.reference_logps
        beta = float(self.kl_coef)

        def step(rows: Tensor) -> LossOutput:
            tokens = self.policy.token_logps(select_rows(rollout.sequences, rows))
            logps, _ = self.token_matrix(tokens, mask.shape[1])
            return grpo_loss(
                logps, rollout.logps[rows], advantages[rows], mask[rows],
                None if reference is None else reference[rows],
                beta=beta, clip_range=self.clip_range, clip_range_high=self.clip_range_high, loss_type=self.loss_type,
                max_completion_length=self.rollout_generation.max_new_tokens,
            )  # fmt: skip

        metrics: dict[str, Tensor | float] = dict(
            self.minibatch_updates(len(rollout.responses), self.num_iterations, self.mini_batch_size, step)
        )
        group_std = scores.view(-1, k).std(dim=1)
        metrics.update(
            {
                "reward_std": group_std.mean(),
                "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
            }
        )
        if reference is not None:
            metrics["kl"] = token_mean(kl_estimate(rollout.logps, reference, "k3"), mask)
        return metrics
