"""RLHF raises the ground-truth score on held-out prompts of the built-in task (3 seeds, all rising).

The RLHF pipeline of the paper, in small: SFT on the demo task's demonstrations (a short warm start,
shared by the seeds and by both methods), then RLOO, GRPO or PPO against the demo task's ground-truth scorer.
The measure is the mean ground-truth score of sampled responses (temperature 1, the same sampler seed before
and after) to 32 held-out test prompts: the expected score that RL optimises. Each seed must end above where it
started; no fixed threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest

from ulma_lightning import (
    DemonstrationDataModule,
    GRPOModule,
    PolicyConfig,
    PPOModule,
    PromptDataModule,
    RLOOModule,
    SFTModule,
)
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.modules.base import OptimizerConfig

pytestmark = pytest.mark.integration  # every test here builds a Trainer

MODEL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
         "tie_word_embeddings": True}  # fmt: skip


def trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, max_epochs=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=100,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0)
    sft = SFTModule(
        PolicyConfig(model_config=MODEL, tokenizer="builtin:demo", reference="none"),
        OptimizerConfig(lr=3e-3, warmup_steps=2, schedule="constant"),
    )
    trainer(90).fit(sft, DemonstrationDataModule(train="demo://demonstration?n=400", max_length=96, batch_size=16))
    folder = tmp_path_factory.mktemp("sft")
    sft.export_hf(folder)
    return folder


def raises_the_score(module: pl.LightningModule, seed: int, steps: int) -> None:
    """The held-out mean score before and after ``steps`` optimiser steps of ``module``: it must rise."""
    data = PromptDataModule(
        train="demo://demonstration?n=200",
        val="demo://demonstration?split=test&n=32",
        max_length=96,
        batch_size=8,
        split_seed=seed,
    )
    run = trainer(steps)
    before = run.validate(module, data, verbose=False)[0]["val/reward"]
    run.fit(module, data)
    after = run.validate(module, data, verbose=False)[0]["val/reward"]
    print(f"{type(module).__name__} seed {seed}: held-out mean score {before:.3f} -> {after:.3f}")
    assert after > before, (seed, before, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_raises_the_held_out_ground_truth_score(sft_model: Path, seed: int) -> None:
    pl.seed_everything(seed)
    module = RLOOModule(
        PolicyConfig(model=str(sft_model), reference="copy"),
        OptimizerConfig(lr=1e-3, schedule="constant"),
        generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=seed),
        eval_generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=123),
        rloo_k=4,
        kl_coef=0.01,
    )  # the scorer: DemoScorer, the ground truth
    raises_the_score(module, seed, steps=8)  # 8 rollout batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_raises_the_held_out_ground_truth_score(sft_model: Path, seed: int) -> None:
    pl.seed_everything(seed)
    module = PPOModule(
        PolicyConfig(model=str(sft_model), reference="copy"),
        OptimizerConfig(lr=1e-3, schedule="constant"),
        generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=seed),
        eval_generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=123),
        samples_per_prompt=4,
        kl_coef=0.01,
        ppo_epochs=2,
        mini_batch_size=16,
    )  # the scorer: DemoScorer, the ground truth; the critic: a copy of the SFT model's backbone
    raises_the_score(
        module, seed, steps=8 * 2 * 2
    )  # optimiser steps: 8 rollout batches (8 prompts x 4 samples), 2 epochs of 2 mini-batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_raises_the_held_out_ground_truth_score(sft_model: Path, seed: int) -> None:
    pl.seed_everything(seed)
    module = GRPOModule(
        PolicyConfig(model=str(sft_model), reference="copy"),
        OptimizerConfig(lr=1e-3, schedule="constant"),
        generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=seed),
        eval_generation=GenerationConfig(max_new_tokens=24, do_sample=True, seed=123),
        num_generations=4,
        beta=0.04,
    )  # the scorer: DemoScorer, the ground truth; the settings of configs/grpo.yaml, RLOO's lr and k
    raises_the_score(module, seed, steps=8)  # 8 rollout batches
