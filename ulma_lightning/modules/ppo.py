"""PPO with a reward model (RLHF, Ziegler et al. 2019 / Ouyang et al. 2022): a separate critic, a
per-token KL penalty against the reference, GAE, clipped policy and value losses."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ulma_lightning.logprobs import IGNORE_INDEX, TokenLogps, decoder_and_head
from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.rollout import Rollout, RolloutModule
from ulma_lightning.modules.shared import OptimizerConfig
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig, select_rows
from ulma_lightning.rl import adaptive_kl_coef, explained_variance, gae, kl_estimate, masked_whiten, ppo_loss


class ValueModel(nn.Module):
    """The critic: a transformer backbone and a linear head giving ``V(s_t)`` per response token.

    ``V`` of the state before response token ``t`` is read at position ``t - 1``, as the policy's
    log-prob of token ``t`` is; values come back flat, in :class:`TokenLogps` order.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, sequences: dict[str, Tensor]) -> TokenLogps:
        hidden = self.backbone(
            input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"], use_cache=False
        ).last_hidden_state
        keep = sequences["labels"][:, 1:] != IGNORE_INDEX
        values = self.head(hidden[:, :-1][keep]).squeeze(-1).float()
        return TokenLogps(values=values, batch_index=keep.nonzero(as_tuple=True)[0], num_sequences=hidden.shape[0])


class PPOModule(RolloutModule):
    """PPO (Schulman et al. 2017) on generations scored by a reward model, with TRL's PPO recipe.

    Per rollout batch: token rewards ``-kl_coef * KL_t`` plus the (penalised, clipped) score on the
    last response token; values from the critic; GAE advantages (whitened) and returns; then
    ``ppo_epochs`` passes of shuffled mini-batches of the clipped surrogate plus ``value_coef`` times
    the clipped value loss (:func:`ulma_lightning.rl.ppo_loss`), one optimiser step each.

    The critic is a separate model: a copy of the initial policy's backbone (with its LoRA adapters
    when ``policy.lora`` is set, so only they train) or the backbone of ``critic_model``, plus a
    linear value head. It is trained with the policy by the same optimiser and saved in checkpoints;
    exports hold only the policy.

    The rollout options (``policy``, ``optimizer``, ``scorer``, ``generation``, ``samples_per_prompt``,
    ``kl_coef``, ``kl_estimator``, ``missing_eos_penalty``, ``reward_clip``, ``max_grad_norm``,
    ``eval_generation``) are :class:`~ulma_lightning.modules.rollout.RolloutModule`'s.

    Args:
        kl_target: if set, adapt ``kl_coef`` toward this mean sequence KL (Ziegler et al. 2019).
        kl_horizon: the adaptive controller's horizon, in samples.
        whiten_rewards: whiten the token rewards (scale only) before GAE.
        gamma: discount.
        lam: GAE's lambda.
        clip_range: the policy ratio's clip ``epsilon``.
        clip_range_value: the value clip around the rollout's values.
        value_coef: weight of the value loss.
        ppo_epochs: optimisation passes over each rollout batch.
        mini_batch_size: rows per optimiser step (default: the whole rollout batch).
        critic_model: hub id or folder whose backbone initialises the critic (e.g. a reward model
            exported with ``ulma export``); default: the initial policy's backbone.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        *,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        whiten_rewards: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        value_coef: float = 0.1,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        critic_model: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, optimizer, **kwargs)
        check_numbers(ppo_epochs=(ppo_epochs, ">= 1"), mini_batch_size=(mini_batch_size, ">= 1"))
        if kl_target is not None and kl_target <= 0:
            raise ValueError(f"kl_target must be > 0 (or null for a fixed kl_coef), got {kl_target}")
        self.kl_target, self.kl_horizon = kl_target, kl_horizon
        self.whiten_rewards, self.gamma, self.lam = whiten_rewards, gamma, lam
        self.clip_range, self.clip_range_value, self.value_coef = clip_range, clip_range_value, value_coef
        self.ppo_epochs, self.mini_batch_size = ppo_epochs, mini_batch_size
        self.critic_model = critic_model
        self.critic: ValueModel | None = None

    runs_under_fsdp2 = False  # the critic is not sharded

    def configure_model(self) -> None:
        super().configure_model()
        if self.critic is not None:
            return
        if self.critic_model is not None:
            from transformers import AutoModel

            backbone = AutoModel.from_pretrained(
                self.critic_model, trust_remote_code=self.policy.config.trust_remote_code
            )
        else:
            backbone = copy.deepcopy(decoder_and_head(self.policy.model)[0])
        self.critic = ValueModel(backbone, backbone.config.hidden_size)

    def update(self, rollout: Rollout) -> dict[str, Tensor | float]:
        mask = rollout.mask
        width = mask.shape[1]
        critic = self.critic
        assert critic is not None  # configure_model built it
        with torch.no_grad():
            old_values, _ = self.token_matrix(critic(rollout.sequences), width)
            scores = self.final_scores(rollout)
            kl = kl_estimate(rollout.logps, rollout.reference_logps, self.kl_estimator) * mask
            rewards = -self.kl_coef * kl
            last = mask.sum(dim=1) - 1
            rewards[torch.arange(len(last), device=mask.device), last] += scores
            if self.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, gamma=self.gamma, lam=self.lam)
            advantages = masked_whiten(advantages, mask)

        def step(rows: Tensor) -> LossOutput:
            sub = select_rows(rollout.sequences, rows)
            logps, _ = self.token_matrix(self.policy.token_logps(sub), width)
            values, _ = self.token_matrix(critic(sub), width)
            return ppo_loss(
                logps,
                rollout.logps[rows],
                advantages[rows],
                values,
                old_values[rows],
                returns[rows],
                mask[rows],
                clip_range=self.clip_range,
                clip_range_value=self.clip_range_value,
                value_coef=self.value_coef,
            )

        metrics: dict[str, Tensor | float] = dict(
            self.minibatch_updates(len(rollout.responses), self.ppo_epochs, self.mini_batch_size, step)
        )
        sequence_kl = kl.sum(dim=1)
        metrics.update(
            {
                "kl": sequence_kl.mean(),
                "reward_penalized": (scores - self.kl_coef * sequence_kl).mean(),
                "value/explained_variance": explained_variance(old_values, returns, mask),
            }
        )
        if self.kl_target is not None:
            mean_kl = float(self.trainer.strategy.reduce(sequence_kl.mean(), reduce_op="mean"))
            steps = len(rollout.responses) * self.trainer.world_size
            self.kl_coef.fill_(
                adaptive_kl_coef(
                    float(self.kl_coef), mean_kl, target=self.kl_target, horizon=self.kl_horizon, steps=steps
                )
            )
        return metrics
