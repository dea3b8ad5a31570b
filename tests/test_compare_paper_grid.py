"""The shipped grid, ``experiments/paper.yaml``, as users run it: every row, with its own callbacks,
data kinds, stage chains and evaluation, for a couple of steps a stage. A test grid of its own
proves that grid, not ours (the RLHF row once failed here only: the shipped callbacks asked the
reward model to generate)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from ulma_lightning.compare.runner import compare_main

pytestmark = pytest.mark.integration  # every test here builds a Trainer

REPO = Path(__file__).resolve().parents[1]


def test_every_row_of_the_shipped_grid_trains_and_evaluates(tmp_path: Path) -> None:
    grid = yaml.safe_load((REPO / "experiments" / "paper.yaml").read_text())
    # the shipped file, made small: 2 steps a stage, 1 seed, fewer prompts; nothing else changes
    grid["seeds"] = [0]
    grid["variants"] = {"ordinary": grid["variants"]["ordinary"]}  # golden: the same code, other task data
    grid["overrides"].update(
        {"trainer.max_steps": 2, "trainer.limit_val_batches": 1, "trainer.num_sanity_val_steps": 0}
    )
    for sources in grid["variants"].values():
        for kind, splits in sources.items():
            sources[kind] = {split: f"{source}&n=32" for split, source in splits.items()}
    grid["base"].update(
        train=grid["base"]["train"].replace("n=4000", "n=32"), val=grid["base"]["val"].replace("n=200", "n=16")
    )
    grid["evaluation"].update({"max_prompts": 4, "generation": {"max_new_tokens": 8}, "kl_max_new_tokens": 8})
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(REPO)  # the grid names configs/ relative to the repository, as the README runs it
    try:
        results = compare_main(["--config", str(path), "--output", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    failed = {r["id"]: r.get("error") for r in results["runs"] if r["status"] != "ok"}
    assert not failed, failed
    expected = {
        f"{run['name']}/{variant}/seed0" for run in [{"name": "base"}, *grid["runs"]] for variant in grid["variants"]
    }
    assert {r["id"] for r in results["runs"]} == expected
    # RLHF as the paper ran it, from the shared base: PPO from SFT(base) (also its reference), rewarded
    # by the reward model the row trained on the pairs from SFT(base) (never by the ground truth)
    result = json.loads((tmp_path / "out/runs/rlhf/ordinary/seed0/result.json").read_text())
    base, sft, reward, ppo = result["stages"]
    assert [s["method"] for s in result["stages"]] == ["sft", "sft", "reward", "ppo"]
    assert (
        base["shared"]
        and base["export"] in (tmp_path / "out/stages" / Path(sft["tensorboard"]).name / "command.txt").read_text()
    )
    reward_config = yaml.safe_load(next(Path(reward["tensorboard"]).rglob("config.yaml")).read_text())["model"][
        "init_args"
    ]
    assert Path(reward_config["policy"]["model"]) == Path(sft["export"])
    assert 0.0 <= result["metrics"]["reward_accuracy"] <= 1.0  # reported beside the RLHF row
    assert json.loads((Path(reward["export"]) / "config.json").read_text())["architectures"][0].endswith(
        "ForSequenceClassification"
    )
    module = yaml.safe_load(next(Path(ppo["tensorboard"]).rglob("config.yaml")).read_text())["model"]["init_args"]
    assert module["scorer"]["class_path"].endswith("HFClassifierScorer")
    assert Path(module["scorer"]["init_args"]["path"]) == Path(reward["export"])
    assert Path(module["policy"]["model"]) == Path(module["policy"]["reference_model"]) == Path(sft["export"])
