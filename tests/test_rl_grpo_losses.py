"""GRPO's pure functions (ulma_lightning.rl): advantages and loss by hand, and against TRL 1.16's GRPOTrainer."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ulma_lightning.rl import grpo_advantages, grpo_loss


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, unbiased std 1; group 2: all equal -> 0
    torch.testing.assert_close(grpo_advantages(rewards, 3), torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(
        grpo_advantages(rewards, 3, scale_rewards="none"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    two = grpo_advantages(torch.tensor([0.0, 4.0]), 2)  # std of (0, 4) is sqrt(8)
    torch.testing.assert_close(two, torch.tensor([-2.0, 2.0]) / (math.sqrt(8) + 1e-4))
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="whole groups"):
        grpo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale_rewards must be 'group' or 'none'"):
        grpo_advantages(rewards, 3, scale_rewards="batch")  # type: ignore[arg-type]


def test_grpo_loss_surrogate_and_kl_by_hand():
    """Two responses (3 and 1 tokens), ratios chosen to hit and miss each clip, k3 KL, and the three averages."""
    old = torch.zeros(2, 3)
    logps = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(0.7), 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # response 0 (A = 1): ratio 1.5 -> clipped to 1.2: -1.2; ratio 0.5 (not clipped for A > 0): -0.5; ratio 1.1: -1.1
    # response 1 (A = -2): ratio 0.7 < 0.8 -> clipped: -min(-1.4, -1.6) = 1.6
    surrogate = [[-1.2, -0.5, -1.1], [1.6]]
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731  r = pi_ref / pi
    kl = [[k3(1 / 1.5), k3(1 / 0.5), k3(1 / 1.1)], [k3(1 / 0.7)]]
    beta = 0.1
    per_token = [[s + beta * k for s, k in zip(rs, rk)] for rs, rk in zip(surrogate, kl)]
    grpo = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="grpo")
    torch.testing.assert_close(grpo.loss, torch.tensor((sum(per_token[0]) / 3 + per_token[1][0]) / 2))
    bnpo = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="bnpo")
    torch.testing.assert_close(bnpo.loss, torch.tensor((sum(per_token[0]) + per_token[1][0]) / 4))
    dr = grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type="dr_grpo", max_completion_length=5)
    torch.testing.assert_close(dr.loss, torch.tensor((sum(per_token[0]) + per_token[1][0]) / (2 * 5)))
    torch.testing.assert_close(grpo.metrics["policy/clipfrac"], torch.tensor(2 / 4))
    torch.testing.assert_close(grpo.metrics["policy/kl"], torch.tensor((sum(kl[0]) + kl[1][0]) / 4))
    torch.testing.assert_close(grpo.losses, torch.tensor([sum(per_token[0]) / 3, per_token[1][0]]))
    # the gradient: clipped tokens only carry the KL term; the padded ones nothing
    grpo.loss.backward()
    kl_grad = lambda r: (1 - r) / 1  # noqa: E731  d k3 / d logp = 1 - pi_ref / pi
    assert logps.grad[1, 1] == 0 and logps.grad[1, 2] == 0
    torch.testing.assert_close(logps.grad[0, 0], torch.tensor(beta * kl_grad(1 / 1.5) / 3 / 2))
    torch.testing.assert_close(logps.grad[0, 1], torch.tensor((-1.0 * 0.5 + beta * kl_grad(1 / 0.5)) / 3 / 2))
    torch.testing.assert_close(logps.grad[1, 0], torch.tensor(beta * kl_grad(1 / 0.7) / 2))


def test_grpo_loss_with_beta_zero_needs_no_reference_and_checks_its_options():
    logps = torch.randn(2, 3)
    mask = torch.ones(2, 3)
    out = grpo_loss(logps, logps, torch.tensor([1.0, -1.0]), mask)  # ratio 1: loss = -mean A = 0
    torch.testing.assert_close(out.loss, torch.tensor(0.0))
    assert "policy/kl" not in out.metrics
    with pytest.raises(ValueError, match="needs reference_logps"):
        grpo_loss(logps, logps, torch.ones(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, logps, torch.ones(2), mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be"):
        grpo_loss(logps, logps, torch.ones(2), mask, loss_type="dapo")  # type: ignore[arg-type]


def test_grpo_loss_ignores_padding_even_when_nan():
    torch.manual_seed(0)
    logps, old, ref = torch.randn(2, 4) * 0.2, torch.randn(2, 4) * 0.2, torch.randn(2, 4) * 0.2
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([0.5, -1.0])
    poisoned = [t.clone().masked_fill(~mask.bool(), float("nan")).requires_grad_() for t in (logps,)]
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        a = grpo_loss(logps, old, adv, mask, ref, beta=0.1, loss_type=loss_type, max_completion_length=4).loss
        b = grpo_loss(
            poisoned[0],
            old.masked_fill(~mask.bool(), float("nan")),
            adv,
            mask,
            ref.masked_fill(~mask.bool(), float("nan")),
            beta=0.1,
            loss_type=loss_type,
            max_completion_length=4,
        ).loss
        torch.testing.assert_close(a, b)
        b.backward()
        assert torch.isfinite(poisoned[0].grad).all()
        poisoned[0].grad = None


def test_length_bias_of_the_averages():
    """Two responses with the same positive advantage and ratio 1, one 1 token long, one 4 tokens: under
    ``grpo`` each token of the short one gets 4x the gradient of a token of the long one; ``bnpo`` and
    ``dr_grpo`` weigh every token alike (Liu et al. 2025)."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    for loss_type, short_over_long in (("grpo", 4.0), ("bnpo", 1.0), ("dr_grpo", 1.0)):
        logps = torch.zeros(2, 4, requires_grad=True)
        grpo_loss(
            logps, torch.zeros(2, 4), torch.tensor([1.0, 1.0]), mask, loss_type=loss_type, max_completion_length=4
        ).loss.backward()
        assert float(logps.grad[0, 0] / logps.grad[1, 0]) == pytest.approx(short_over_long), loss_type


# --------------------------------------------------------------------------- TRL 1.16 as the oracle
def _trl_advantages(rewards: torch.Tensor, k: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the sum_then_normalize advantage lines."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std_rewards = nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_grpo_advantages_match_trl(scale_rewards):
    from trl import GRPOConfig

    assert GRPOConfig.__dataclass_fields__["scale_rewards"].default == "group"  # TRL's default is ours
    torch.manual_seed(1)
    rewards = torch.randn(12)
    torch.testing.assert_close(
        grpo_advantages(rewards, 4, scale_rewards=scale_rewards), _trl_advantages(rewards, 4, scale_rewards)
    )


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl_compute_loss(loss_type, beta):
    """Our loss against TRL 1.16's own ``GRPOTrainer._compute_loss`` on known per-token log-probs, old
    log-probs (several inner updates in), reference log-probs and advantages; metrics too."""
    from trl import GRPOTrainer

    torch.manual_seed(2)
    per_token = torch.randn(4, 5) * 0.3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    old = per_token + torch.randn(4, 5) * 0.3  # ratios on both sides of the clip range
    ref = per_token + torch.randn(4, 5) * 0.2
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2])
    max_completion_length = 7

    identity = lambda x, **kw: x  # noqa: E731
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (per_token, torch.zeros_like(per_token), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=max_completion_length,
        current_gradient_accumulation_steps=1,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(reduce=identity, gather=identity, num_processes=1),
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.ones(4, 2, dtype=torch.long),
        "prompt_mask": torch.ones(4, 2, dtype=torch.long),
        "completion_ids": torch.ones(4, 5, dtype=torch.long),
        "completion_mask": mask,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "advantages": advantages,
    }
    expected = GRPOTrainer._compute_loss(fake, None, inputs)
    ours = grpo_loss(
        per_token * mask, old * mask, advantages, mask, ref * mask if beta else None, beta=beta, clip_range=0.2,
        clip_range_high=0.28, loss_type=loss_type, max_completion_length=max_completion_length,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, expected)
    logged = fake._metrics["train"]
    assert 0 < logged["clip_ratio/region_mean"][0] < 1  # the case exercises the clipping
    torch.testing.assert_close(ours.metrics["policy/clipfrac"], torch.tensor(logged["clip_ratio/region_mean"][0]))
    if beta:
        torch.testing.assert_close(ours.metrics["policy/kl"], torch.tensor(logged["kl"][0]))
