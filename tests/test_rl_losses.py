"""The RLHF pure functions (ulma_lightning.rl) against hand computations, the PPO paper, and TRL 1.16's RLOO."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ulma_lightning.rl import (
    adaptive_kl_coef,
    explained_variance,
    gae,
    kl_estimate,
    masked_whiten,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    rloo_loss,
    to_token_matrix,
)


def test_gae_on_a_hand_made_trajectory():
    # one response of 3 tokens then padding; a second of 1 token
    rewards = torch.tensor([[0.0, -0.1, 1.0, 9.0], [2.0, 9.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0], [1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    gamma, lam = 0.9, 0.5
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # by hand, from the end: V after the last token is 0
    d2 = 1.0 + gamma * 0 - 0.4
    d1 = -0.1 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    expected = torch.tensor([[a0, a1, a2, 0.0], [2.0 - 1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.6 - 1.0, 0.5 - 2.0, 0.3 - 3.0]]))


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), logp - ref)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), (r - 1) - torch.log(r))
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())
    with pytest.raises(ValueError, match="k1' or 'k3"):
        kl_estimate(logp, ref, "k2")  # type: ignore[arg-type]


def test_whiten_uses_masked_entries_only():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kept = torch.tensor([1.0, 2.0, 3.0])
    expected = (kept - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + 1e-8)
    out = masked_whiten(values, mask)
    torch.testing.assert_close(out[mask.bool()], expected)
    assert bool((out[~mask.bool()] == 0).all())
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False)[mask.bool()], expected + kept.mean())


def test_ppo_policy_loss_by_hand():
    logps = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = ppo_policy_loss(logps, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.5 > 1.2 with A>0 -> clipped: -1.2; token 1: ratio 0.5, A>0: max(-0.5, -0.8) = -0.5
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 - 0.5) / 2))
    torch.testing.assert_close(out.metrics["policy/clipfrac"], torch.tensor(0.5))
    out.loss.backward()
    # the clipped token has no gradient; the padded one neither
    assert logps.grad[0, 0] == 0 and logps.grad[0, 2] == 0 and logps.grad[0, 1] != 0


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    out = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip_range_value=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: max(1, 1) = 1
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (3.24 + 1.0) / 2))
    combined = ppo_loss(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), values, old, returns, torch.ones(1, 2), value_coef=0.5
    )
    torch.testing.assert_close(combined.loss, torch.tensor(-1.0 + 0.5 * out.loss.item()))


def test_masking_excludes_padding_tokens_from_the_losses():
    torch.manual_seed(0)
    logps, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    poisoned = [t.clone().masked_fill(~mask.bool(), float("nan")) for t in (logps, old, adv)]
    a = ppo_policy_loss(logps, old, adv, mask).loss
    b = ppo_policy_loss(*poisoned, mask).loss
    torch.testing.assert_close(a, b)
    assert torch.isfinite(b)


def test_to_token_matrix_follows_row_major_token_order():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    rows = torch.tensor([0, 0, 0, 2, 2])
    matrix, mask = to_token_matrix(values, rows, 3)
    torch.testing.assert_close(matrix, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 0.0]]))
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, True, False]]
    matrix.sum().backward()
    assert values.grad.tolist() == [1.0] * 5


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    adv = rloo_advantages(rewards, 3)
    torch.testing.assert_close(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0]))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(rewards, 1)


def _trl_rloo_advantages(rewards: torch.Tensor, k: int, normalize: bool) -> torch.Tensor:
    """TRL 1.16 RLOOTrainer._generate_and_score_completions, the advantage lines, with its own nanstd."""
    from trl.trainer.utils import nanstd

    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(normalize):
    torch.manual_seed(1)
    rewards = torch.randn(12)
    torch.testing.assert_close(
        rloo_advantages(rewards, 4, normalize=normalize), _trl_rloo_advantages(rewards, 4, normalize)
    )


def test_rloo_loss_matches_trl_compute_loss():
    """Our loss against TRL 1.16's own ``RLOOTrainer._compute_loss``, run on known per-token log-probs."""
    from trl import RLOOTrainer

    torch.manual_seed(2)
    per_token = torch.randn(4, 5) * 0.3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    old = (per_token * mask).sum(1) + torch.tensor([0.5, -0.05, 0.0, -0.6])
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2])

    identity = lambda x, **kw: x  # noqa: E731
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **kw: (per_token, torch.zeros_like(per_token), None),
        epsilon_low=0.2,
        epsilon_high=0.28,
        aux_loss_enabled=False,
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(reduce=identity, gather=identity),
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.ones(4, 2, dtype=torch.long),
        "prompt_mask": torch.ones(4, 2, dtype=torch.long),
        "completion_ids": torch.ones(4, 5, dtype=torch.long),
        "completion_mask": mask,
        "old_logps": old,
        "advantages": advantages,
    }
    expected = RLOOTrainer._compute_loss(fake, None, inputs)
    ours = rloo_loss((per_token * mask).sum(1), old, advantages, clip_range=0.2, clip_range_high=0.28)
    torch.testing.assert_close(ours.loss, expected)
    torch.testing.assert_close(
        ours.metrics["policy/clipfrac"], torch.tensor(fake._metrics["train"]["clip_ratio/region_mean"][0])
    )


def test_rloo_loss_gradient_is_reinforce_on_the_first_update():
    logps = torch.tensor([-3.0, -2.0], requires_grad=True)
    adv = torch.tensor([0.7, -0.7])
    rloo_loss(logps, logps.detach(), adv).loss.backward()
    torch.testing.assert_close(logps.grad, -adv / 2)


def test_adaptive_kl_coef_and_explained_variance():
    assert adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=100, steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, 5.7, target=6.0, horizon=100, steps=10) == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    targets = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(targets, 2.0), targets, mask).item() == pytest.approx(0.0)
