"""``ulma compare``'s RLHF row as the paper ran it: SFT, a reward model trained on the preference
pairs, then PPO from the SFT model, rewarded by that reward model (never by the ground truth)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ulma_lightning.compare.runner import compare_main

REPO = Path(__file__).resolve().parents[1]

RLHF_ROW = {
    "name": "rlhf",
    "label": "RLHF (reward model, then PPO)",
    "stages": [
        {"method": "sft", "data": "demonstration"},
        {"method": "reward", "data": "pairwise"},
        {
            "method": "ppo",
            "data": "demonstration",
            "reward_arg": "model.init_args.scorer.init_args.path",
            "overrides": {"model.init_args.scorer": {"class_path": "ulma_lightning.evaluation.HFClassifierScorer"}},
        },
    ],
}


def test_the_rlhf_row_rewards_ppo_with_the_reward_model_it_trained(tmp_path: Path) -> None:
    paper = yaml.safe_load((REPO / "experiments" / "paper.yaml").read_text())
    (shipped,) = [run for run in paper["runs"] if run["name"] == "rlhf"]
    assert shipped["stages"] == RLHF_ROW["stages"]  # the test runs the row the grid ships
    grid = {
        "name": "rlhf",
        "seeds": [0],
        "overrides": {"trainer.max_steps": 1, "trainer.limit_val_batches": 1, "trainer.enable_progress_bar": False,
                      "trainer.enable_model_summary": False, "data.init_args.batch_size": 8},
        "variants": {"ordinary": {"demonstration": "demo://demonstration?n=24", "pairwise": {"train": "demo://pairwise?n=24"}}},
        "evaluation": {"prompts": "demo://demonstration?split=test&n=8", "golden": "demo://demonstration?split=test&n=8",
                       "generation": {"max_new_tokens": 6}, "kl_max_new_tokens": 6, "batch_size": 8},
        "runs": [{"name": "sft", "stages": [{"method": "sft", "data": "demonstration"}]}, RLHF_ROW],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        compare_main(["--config", str(path), "--output", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    result = json.loads((tmp_path / "out" / "runs" / "rlhf" / "ordinary" / "seed0" / "result.json").read_text())
    assert result["status"] == "ok"
    sft, reward, ppo = result["stages"]
    assert [s["method"] for s in result["stages"]] == ["sft", "reward", "ppo"]
    assert json.loads((Path(reward["export"]) / "config.json").read_text())["architectures"][0].endswith("ForSequenceClassification")
    config = yaml.safe_load(next(Path(ppo["tensorboard"]).rglob("config.yaml")).read_text())
    module = config["model"]["init_args"]
    assert module["scorer"]["class_path"].endswith("HFClassifierScorer")
    assert Path(module["scorer"]["init_args"]["path"]) == Path(reward["export"])
    assert Path(module["policy"]["model"]) == Path(module["policy"]["reference_model"]) == Path(sft["export"])
