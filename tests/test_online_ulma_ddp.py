"""OnlineULMAModule under DDP and FSDP2: 2 CPU processes (gloo) sample and label their own rollouts and end
with identical weights (the pattern of tests/test_rl_ddp.py); under FSDP2 the full model is exported and a
resumed run continues exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rl_helpers import run_rl_ddp, run_rl_ddp_and_resume

pytestmark = pytest.mark.integration  # every test here builds a Trainer

ONLINE = (
    "OnlineULMAModule(policy, scorer=LengthScorer(), generation={generation}, samples_per_prompt=2, mini_batch_size=4, "
    "ref_refresh_every=2)"
)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a))


def test_online_ulma_under_ddp_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    ranks = run_rl_ddp(
        tmp_path,
        "OnlineULMAModule(policy, scorer=LengthScorer(), generation=generation, samples_per_prompt=2, "
        "mini_batch_size=4, ref_refresh_every=2)",
    )
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


def test_online_ulma_under_fsdp2_decodes_in_lockstep_and_exports_the_full_model(tmp_path: Path) -> None:
    """Rank 0 samples 2 new tokens, rank 1 samples 7: with a sharded policy every decoding step
    all-gathers weights, so rank 0 must keep stepping until rank 1 is done (without it, gloo fails)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    uneven = "GenerationConfig(max_new_tokens=2 + 5 * RANK, do_sample=True)"
    ranks = run_rl_ddp(tmp_path, ONLINE.format(generation=uneven), strategy="fsdp2", export=True)
    assert [r["strategy"] for r in ranks] == ["FSDP2Strategy"] * 2 and ranks[0][
        "step"
    ] == 4  # 2 batches x 2 mini-batches
    for batch0, batch1 in zip(ranks[0]["index"], ranks[1]["index"]):
        assert set(batch0).isdisjoint(batch1)
    assert all(math.isfinite(loss) for r in ranks for loss in r["losses"]) and len(ranks[0]["losses"]) == 2
    weights, start = ranks[0]["weights"], ranks[0]["start"]
    assert weights.keys() == ranks[1]["weights"].keys() == start.keys() and weights
    for name in weights:  # the full (gathered) weights: the same on both ranks
        assert close(weights[name], ranks[1]["weights"][name]), name
    assert sum(not close(weights[name], start[name]) for name in weights) > len(weights) // 2  # trained
    policy = {k.removeprefix("policy.model."): v for k, v in weights.items()}
    assert ranks[0]["reference"].keys() == policy.keys()
    for name, value in ranks[0]["reference"].items():  # the sharded reference was refreshed from the sharded policy
        assert close(policy[name], value), name
    exported = load_file(tmp_path / "hf_model" / "model.safetensors")
    for name, tensor in exported.items():  # rank 0 wrote the gathered weights of the end of training
        assert close(float(tensor.double().sum()), policy[name]), name
    assert set(policy) - set(exported) <= {"lm_head.weight"}  # tied to the embeddings, if anything
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model")  # a whole model that loads


def test_online_ulma_under_fsdp2_resumes_exactly_with_its_refreshed_reference(tmp_path: Path) -> None:
    """A run cut after the first rollout batch (step 2, where the reference was refreshed) and resumed
    from its sharded checkpoint ends as the uninterrupted run: same second batch, loss and weights.
    Both runs go in one launch of the 2 processes (the start-up of 4 processes was most of its cost)."""
    whole, resumed = run_rl_ddp_and_resume(
        tmp_path, ONLINE.format(generation="generation"), "step=2.ckpt", strategy="fsdp2"
    )
    assert (tmp_path / "checkpoints" / "step=2.ckpt").is_dir()  # a sharded checkpoint folder
    for rank in (0, 1):
        assert resumed[rank]["index"] == whole[rank]["index"][1:] and resumed[rank]["step"] == 4
        assert (
            abs(resumed[rank]["losses"][0] - whole[rank]["losses"][1]) <= 1e-7
        )  # the reference of step 2 was restored
        for key in ("weights", "reference"):
            assert resumed[rank][key].keys() == whole[rank][key].keys()
            for name, value in whole[rank][key].items():
                assert close(resumed[rank][key][name], value), (key, name)
