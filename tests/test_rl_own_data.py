"""Nothing of the demo task runs on your own prompts: configs/ppo.yaml and configs/rloo.yaml with the
own-data override of docs/rlhf.md (your SFT model, your reward model, your prompts) test on your
held-out prompts, skip the demo's scorer in GenerationSamples (said in the log), and without a reward
model stop with an error that says which scorer to set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from rl_helpers import small_run, tiny_causal_lm, tiny_reward_model, ulma_fit

from ulma_lightning.evaluation.scorers import HFClassifierScorer

pytestmark = pytest.mark.integration  # every test here builds a Trainer

PROMPTS = [
    "How do I repot a cactus?", "What should I pack for a hike?", "How do I clean a keyboard?",
    "Give me a tip for learning chess.", "How do I boil an egg?", "What is a good stretch after running?",
    "How can I keep basil alive?", "How do I iron a shirt?",
]  # fmt: skip


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {
        "prompts": prompts,
        "sft": tiny_causal_lm(root / "sft_model"),
        "reward": tiny_reward_model(root / "reward_model"),
    }


def own_data_override(own: dict[str, Path], *, scorer: bool = True) -> list[str]:
    """The override of docs/rlhf.md ("Your own model, reward model and prompts"), as written there."""
    args = ["--model.init_args.policy.model", str(own["sft"])]
    if scorer:
        args += [
            "--model.init_args.scorer",
            json.dumps(
                {
                    "class_path": "ulma_lightning.evaluation.HFClassifierScorer",
                    "init_args": {"path": str(own["reward"])},
                }
            ),
        ]
    return args + ["--data.init_args.train", str(own["prompts"])]


@pytest.mark.parametrize("config", ["ppo", "rloo"])
def test_own_prompts_and_reward_model_get_nothing_of_the_demo(
    config: str, own: dict[str, Path], tmp_path: Path, caplog
) -> None:
    small = [
        a
        for a in small_run(tmp_path)
        if not a.startswith(("--model.init_args.policy.model_config", "--data.init_args.train"))
    ]
    with caplog.at_level(logging.WARNING):
        cli = ulma_fit(config, [*small, *own_data_override(own)])
    data, module = cli.datamodule, cli.model
    assert isinstance(module.scorer, HFClassifierScorer) and module.scorer.path == str(own["reward"])
    # no demo test (or validation) data: test falls back to the prompts held out of your train file
    assert data.sources["val"] is None and data.sources["test"] is None and data.test_from_val
    assert data.source_of("test") == str(own["prompts"]) == data.source_of("val")
    assert {e.prompt for e in data.examples["val"]} <= set(PROMPTS)
    # the callback's demo scorer is skipped, with a line in the log
    assert any("GenerationSamples: scorer 'demo' (DemoScorer) skipped" in r.getMessage() for r in caplog.records)
    assert cli.trainer.global_step > 0


@pytest.mark.parametrize("config", ["ppo", "rloo"])
def test_own_prompts_without_a_reward_model_stop_naming_the_scorer(
    config: str, own: dict[str, Path], tmp_path: Path
) -> None:
    small = [
        a
        for a in small_run(tmp_path)
        if not a.startswith(("--model.init_args.policy.model_config", "--data.init_args.train"))
    ]
    with pytest.raises(
        ValueError,
        match=r"model.init_args.scorer, is DemoScorer .* data.train is '.*prompts.jsonl'.*HFClassifierScorer",
    ):
        ulma_fit(config, [*small, *own_data_override(own, scorer=False)])
