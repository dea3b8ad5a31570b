"""OnlineULMAModule under DDP: 2 CPU processes (gloo) sample and label their own rollouts and end with
identical weights (the pattern of tests/test_rl_ddp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rl_helpers import run_rl_ddp

pytestmark = pytest.mark.integration  # every test here builds a Trainer


def test_online_ulma_under_ddp_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    ranks = run_rl_ddp(tmp_path, "OnlineULMAModule(policy, scorer=LengthScorer(), generation=generation, samples_per_prompt=2, mini_batch_size=4, ref_refresh_every=2)")
    assert len(ranks[0]["index"]) == 2
    for batch0, batch1 in zip(ranks[0]["index"], ranks[1]["index"]):
        assert set(batch0).isdisjoint(batch1)  # each rank sampled for its own prompts
    for key in ("weights", "reference"):  # 2 rollout batches x 2 mini-batches of 4 responses; refreshed at step 2 and 4
        values0, values1 = ranks[0][key], ranks[1][key]
        assert values0.keys() == values1.keys() and values0
        for name in values0:
            assert abs(values0[name] - values1[name]) <= 1e-6 * max(1.0, abs(values0[name])), (key, name)
    policy = {k.removeprefix("policy.model."): v for k, v in ranks[0]["weights"].items()}
    for name, value in ranks[0]["reference"].items():  # refreshed after the last step: the reference is the policy
        assert abs(policy[name] - value) <= 1e-6 * max(1.0, abs(value)), name
