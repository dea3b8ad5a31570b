"""The RL options end to end, through ``ulma fit --config configs/ppo.yaml|rloo.yaml`` for a few steps:
the adaptive KL coefficient (moves toward its target, step by step), the k3 estimator, a separate
critic (``critic_model``), ``whiten_rewards``, the missing-EOS penalty, and ``bf16-mixed`` precision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rl_helpers import scalars, small_run, tiny_reward_model, ulma_fit

pytestmark = pytest.mark.integration  # every test here builds a Trainer

KL_COEF = 0.05


@pytest.mark.parametrize("target", [1e-9, 1e3], ids=["kl-above-target", "kl-below-target"])
def test_adaptive_kl_coefficient_moves_toward_its_target(target: float, tmp_path: Path) -> None:
    """Each step the coefficient rises when the step's KL is above ``kl_target`` and falls when below."""
    cli = ulma_fit(
        "ppo",
        [*small_run(tmp_path, steps=4), "--model.init_args.kl_estimator=k3", f"--model.init_args.kl_coef={KL_COEF}",
         f"--model.init_args.kl_target={target}", "--model.init_args.kl_horizon=8",
         "--model.init_args.optimizer.lr=1e-2", "--model.init_args.ppo_epochs=1"],
    )  # fmt: skip
    logged = scalars(tmp_path)
    coefs, kls = logged["train/kl_coef_step"], logged["train/kl_step"]
    assert len(coefs) == len(kls) == 4
    assert all(kl >= 0 for kl in kls)  # k3 is never negative
    previous = KL_COEF
    for coef, kl in zip(coefs, kls):
        if kl > target:
            assert coef > previous, (coefs, kls)
        elif kl < target:
            assert coef < previous, (coefs, kls)
        previous = coef
    moved = [c for c in coefs if not math.isclose(c, KL_COEF)]
    assert moved and float(cli.model.kl_coef) == pytest.approx(coefs[-1])
    if target > 1:
        assert coefs[-1] < KL_COEF  # the KL stays far below 1e3 nats: the coefficient only falls
    else:
        assert (
            any(kl > target for kl in kls[1:]) and coefs[-1] > coefs[0]
        )  # the policy moved off its reference: it rises


def test_separate_critic_k3_whitening_and_missing_eos_penalty(tmp_path: Path) -> None:
    """``critic_model`` (a reward-model folder of another width), ``whiten_rewards``, ``kl_estimator: k3`` and
    ``missing_eos_penalty`` in one PPO run: the critic is that folder's backbone, and the penalty is in the
    penalised reward of the responses cut without EOS."""
    critic_folder = tiny_reward_model(tmp_path / "critic", hidden_size=48, intermediate_size=96)
    penalty = 1.0
    cli = ulma_fit(
        "ppo",
        [*small_run(tmp_path / "run", steps=3), f"--model.init_args.critic_model={critic_folder}",
         "--model.init_args.whiten_rewards=true", "--model.init_args.kl_estimator=k3",
         f"--model.init_args.missing_eos_penalty={penalty}", "--model.init_args.samples_per_prompt=1"],
    )  # fmt: skip
    module = cli.model
    assert module.whiten_rewards and module.kl_estimator == "k3" and module.missing_eos_penalty == penalty
    assert module.critic.head.in_features == 48  # the critic folder's backbone, not a copy of the 32-wide policy
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(critic_folder).state_dict()["norm.weight"]
    assert not torch.equal(module.critic.backbone.norm.weight.detach().cpu(), saved)  # and it trained
    logged = scalars(tmp_path / "run")
    for reward, penalized, no_eos, kl, coef in zip(
        logged["train/reward_step"],
        logged["train/reward_penalized_step"],
        logged["train/no_eos_fraction_step"],
        logged["train/kl_step"],
        logged["train/kl_coef_step"],
    ):
        assert no_eos > 0  # 4 new tokens: most responses are cut
        assert penalized == pytest.approx(reward - penalty * no_eos - coef * kl, abs=1e-5)
    assert all(math.isfinite(v) for v in logged["train/value/loss_step"] + logged["train/loss_step"])


@pytest.mark.parametrize("config", ["ppo", "rloo"])
def test_bf16_mixed_fit_has_finite_losses(config: str, tmp_path: Path) -> None:
    fewer = ["--model.init_args.samples_per_prompt=1"] if config == "ppo" else []
    cli = ulma_fit(
        config, [*small_run(tmp_path, steps=2), *fewer, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu"]
    )
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step > 0
    logged = scalars(tmp_path)
    losses = logged["train/loss_step"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(v) for v in logged["train/kl_step"] + logged["val/reward"])
