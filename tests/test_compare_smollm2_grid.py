"""``experiments/paper-smollm2.yaml``, the comparison on a real pretrained LM, run here with the SmolLM2
folder (written by scripts/get_smollm2.py, 540 MB) replaced by a tiny pretrained-style stand-in: a
local Llama folder with its own tokenizer and chat template. Everything else is used as shipped,
two steps a stage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ulma_lightning.compare.runner import compare_main
from ulma_lightning.compare.spec import load_grid
from ulma_lightning.compare.stages import plan_grid

REPO = Path(__file__).resolve().parents[1]
GRID_FILE = REPO / "experiments" / "paper-smollm2.yaml"
MODEL = "models/smollm2-135m-instruct"


def stand_in(folder: Path) -> Path:
    """A tiny Llama folder saved with save_pretrained, with the task tokenizer and its chat template."""
    from ulma_lightning.export import export_hf
    from ulma_lightning.policy import Policy, PolicyConfig

    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
    }
    policy = Policy(PolicyConfig(model_config=config, tokenizer="builtin:task", reference="none"))
    policy.build()
    export_hf(policy.model, policy.tokenizer, folder)
    return folder


@pytest.mark.integration
def test_the_smollm2_grid_starts_every_row_from_the_model_and_runs(tmp_path: Path) -> None:
    model = stand_in(tmp_path / "smollm2")
    grid = yaml.safe_load(GRID_FILE.read_text().replace(MODEL, str(model)))
    grid["seeds"] = [0]
    grid["overrides"].update(
        {"trainer.max_steps": 2, "trainer.limit_val_batches": 1, "trainer.num_sanity_val_steps": 0}
    )
    grid["evaluation"].update({"max_prompts": 4, "generation": {"max_new_tokens": 6}, "kl_max_new_tokens": 6})
    grid["runs"] = [r for r in grid["runs"] if r["name"] in ("sft", "sft_dpo", "ulma")]
    grid["variants"] = {"ordinary": grid["variants"]["ordinary"]}
    path = tmp_path / "paper-smollm2.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        plan = plan_grid(load_grid(path))
        results = compare_main(["--config", str(path), "--output", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    assert all(
        plan.stages[i.stages[0]].policy_from is None for i in plan.instances
    )  # no base stage: the model is the base
    first = {plan.stages[i.stages[0]].key: plan.stages[i.stages[0]].base_args for i in plan.instances}
    assert all(args[args.index("--model.init_args.policy.model") + 1] == str(model) for args in first.values())
    failed = {r["id"]: r.get("error") for r in results["runs"] if r["status"] != "ok"}
    assert not failed, failed
    start = results["tables"]["ordinary"]["untrained"]
    assert start["label"] == "start (smollm2)"  # the pretrained model, not an untrained one
    ulma = next(r for r in results["runs"] if r["run"] == "ulma")
    config = yaml.safe_load(next(Path(ulma["stages"][0]["tensorboard"]).rglob("config.yaml")).read_text())["model"][
        "init_args"
    ]["policy"]
    assert Path(config["model"]) == model and config["model_config"] is None


def test_the_shipped_smollm2_grid_is_valid() -> None:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        grid, held = load_grid(GRID_FILE), load_grid(GRID_FILE, heldout=True)
    finally:
        os.chdir(cwd)
    assert grid.base is None and grid.overrides["model.init_args.policy.model"] == MODEL
    assert {r.name for r in grid.runs} == {"sft", "sft_dpo", "dpo", "pointwise_dpo", "ulma", "unlikelihood", "kto"}
    assert grid.seeds == [0] and held.seeds == [1]  # one seed a set (amended before any result)
    assert "seed=1" in held.evaluation.prompts and "stratified=true" in grid.evaluation.prompts
    # the tuning's picks, one per chain (sft>dpo: DPO after SFT)
    assert set(grid.tuned) == {"sft", "dpo", "pointwise_dpo", "ulma", "unlikelihood", "kto", "sft>dpo"}
