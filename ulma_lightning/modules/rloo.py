"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over k samples per prompt; no critic."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.rollout import Rollout, RolloutModule
from ulma_lightning.modules.shared import OptimizerConfig
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig, select_rows
from ulma_lightning.rl import kl_estimate, rloo_advantages, rloo_loss


class RLOOModule(RolloutModule):
    """RLOO, as TRL 1.16's ``RLOOTrainer``: per prompt ``k`` sampled responses; reward
    ``r_i = score_i - kl_coef * sum_t KL_t`` (a sequence-level KL penalty, ``k1`` by default); advantage
    ``r_i`` minus the mean reward of the prompt's other ``k - 1`` responses
    (:func:`ulma_lightning.rl.rloo_advantages`); loss: the clipped sequence-ratio REINFORCE
    objective (:func:`ulma_lightning.rl.rloo_loss`), ``num_iterations`` passes over each rollout batch
    in mini-batches (1 pass: plain REINFORCE with the leave-one-out baseline).

    The rollout options (``policy``, ``optimizer``, ``scorer``, ``generation``, ``kl_coef``,
    ``kl_estimator``, ``missing_eos_penalty``, ``reward_clip``, ``max_grad_norm``,
    ``eval_generation``) are :class:`~ulma_lightning.modules.rollout.RolloutModule`'s; ``rloo_k``
    stands for its ``samples_per_prompt``.

    Args:
        rloo_k: responses sampled per prompt (>= 2).
        normalize_advantages: standardise the advantages over the batch.
        clip_range: lower clip ``epsilon`` of the sequence ratio.
        clip_range_high: upper clip (default: ``clip_range``).
        num_iterations: optimisation passes over each rollout batch.
        mini_batch_size: rows (responses) per optimiser step (default: the whole rollout batch).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        rloo_k: int = 4,
        normalize_advantages: bool = False,
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if rloo_k < 2:
            raise ValueError(
                f"rloo_k must be >= 2 (the leave-one-out baseline needs another sample of the prompt), got {rloo_k}"
            )
        if "samples_per_prompt" in kwargs:
            raise TypeError("RLOOModule takes rloo_k (responses per prompt), not samples_per_prompt")
        super().__init__(policy, optimizer, samples_per_prompt=rloo_k, **kwargs)
        check_numbers(num_iterations=(num_iterations, ">= 1"), mini_batch_size=(mini_batch_size, ">= 1"))
        self.normalize_advantages = normalize_advantages
        self.clip_range, self.clip_range_high = clip_range, clip_range_high
        self.num_iterations, self.mini_batch_size = num_iterations, mini_batch_size

    def update(self, rollout: Rollout) -> dict[str, Tensor | float]:
        mask = rollout.mask
        scores = self.final_scores(rollout)
        sequence_kl = (kl_estimate(rollout.logps, rollout.reference_logps, self.kl_estimator) * mask).sum(dim=1)
        rewards = scores - self.kl_coef * sequence_kl
        advantages = rloo_advantages(rewards, self.samples_per_prompt, normalize=self.normalize_advantages)
        old_logps = (rollout.logps * mask).sum(dim=1)

        def step(rows: Tensor) -> LossOutput:
            logps = self.policy.token_logps(select_rows(rollout.sequences, rows)).per_sequence(average=False)
            return rloo_loss(
                logps,
                old_logps[rows],
                advantages[rows],
                clip_range=self.clip_range,
                clip_range_high=self.clip_range_high,
            )

        metrics: dict[str, Tensor | float] = dict(
            self.minibatch_updates(len(rollout.responses), self.num_iterations, self.mini_batch_size, step)
        )
        metrics.update({"kl": sequence_kl.mean(), "reward_penalized": rewards.mean()})
        return metrics
