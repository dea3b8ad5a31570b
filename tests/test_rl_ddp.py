"""PPO under DDP: 2 CPU processes (gloo) generate their own rollouts and end with identical weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from rl_helpers import run_rl_ddp

pytestmark = pytest.mark.integration  # every test here builds a Trainer


def test_ppo_under_ddp_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    ranks = run_rl_ddp(
        tmp_path, "PPOModule(policy, scorer=LengthScorer(), generation=generation, ppo_epochs=2, mini_batch_size=2)"
    )
    for batch0, batch1 in zip(ranks[0]["index"], ranks[1]["index"]):
        assert set(batch0).isdisjoint(batch1)  # each rank generated for its own prompts
    assert len(ranks[0]["index"]) == 2
    weights0, weights1 = ranks[0]["weights"], ranks[1]["weights"]
    assert weights0.keys() == weights1.keys() and any(k.startswith("critic.") for k in weights0)
    for name in weights0:  # gradients were averaged at every one of the 2 x 2 x 2 optimiser steps
        assert abs(weights0[name] - weights1[name]) <= 1e-6 * max(1.0, abs(weights0[name])), name
