"""configs/ppo.yaml and configs/rloo.yaml through the ``ulma`` CLI: fit, then ``ulma evaluate`` on the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, TINY_LLAMA
from helpers import run_ulma

pytestmark = pytest.mark.integration  # every test here builds a Trainer


@pytest.mark.parametrize("config", ["ppo", "rloo"])
def test_config_fits_and_evaluates(config: str, tmp_path: Path) -> None:
    cfg = str(REPO / "configs" / f"{config}.yaml")
    small = [
        f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}",
        "--model.init_args.generation.max_new_tokens=6",
        "--data.init_args.train=demo://demonstration?n=8", "--data.init_args.val=demo://demonstration?split=test&n=4",
        "--data.init_args.test=demo://demonstration?split=test&n=4", "--data.init_args.batch_size=4",
    ]  # fmt: skip
    fit = run_ulma(
        ["fit", "--config", cfg, *small, "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert next(tmp_path.rglob("hf_model/config.json"))
    report_path = tmp_path / "report.json"
    evaluate = run_ulma(
        ["evaluate", "--config", cfg, *small, "--ckpt_path", str(ckpt), "--output", str(report_path),
         "--evaluation.output", str(tmp_path / "predictions.jsonl"), "--evaluation.scorers",
         '[{"class_path": "ulma_lightning.evaluation.DemoScorer"}]'],
        tmp_path,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["test"]["test/reward"] <= 1.0
    assert report["generation"]["demo"]["n"] == 4
