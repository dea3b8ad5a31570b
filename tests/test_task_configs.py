"""configs/task/: the ULMA smoke path on task:// data (fit and evaluate with the ground-truth scorer,
in a subprocess), and the GPU overlays for HH data composed with the method configs (--print_config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from helpers import run_cli

from ulma_lightning.cli import main

pytestmark = pytest.mark.integration  # every test here builds a Trainer

TASK = REPO / "configs" / "task"


def test_task_ulma_config_fits_and_evaluates_with_the_task_scorer(tmp_path: Path) -> None:
    common = [
        "--config", str(TASK / "ulma.yaml"),
        "--data.init_args.train", "task://binary?n=24",
        "--data.init_args.val", "task://binary?split=val&n=6",
        "--data.init_args.test", "task://binary?split=test&n=6",
        "--data.init_args.batch_size", "8",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    fit = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.num_sanity_val_steps", "0"]
    run_cli(["fit", *common, *fit], tmp_path)
    ckpt = next(tmp_path.glob("task_ulma/version_0/checkpoints/last.ckpt"))
    output = tmp_path / "evaluation.json"
    run_cli(
        [
            "evaluate",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--output",
            str(output),
            "--evaluation.generation.max_new_tokens",
            "8",
        ],
        tmp_path,
    )
    report = json.loads(output.read_text())
    assert report["num_predictions"] == 6
    assert 0.0 <= report["generation"]["task"]["mean"] <= 1.0
    rows = [json.loads(line) for line in Path(report["predictions"]).read_text().splitlines()]
    assert all(0.0 <= row["scores"]["task"] <= 1.0 for row in rows)


@pytest.mark.parametrize(
    ("method", "overlay"),
    [
        ("ulma.yaml", "hh_harmless_binary.yaml"),
        ("sft.yaml", "hh_golden.yaml"),
        ("ulma_continuous.yaml", "hh_red_team.yaml"),
    ],
)
def test_gpu_overlays_compose_with_the_method_configs(method: str, overlay: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / method),
                "--config",
                str(TASK / "gpu" / overlay),
                "--print_config",
            ]
        )
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((TASK / "gpu" / overlay).read_text())
    for key, value in written["data"]["init_args"].items():
        assert printed["data"]["init_args"][key] == value, key
    assert printed["model"]["init_args"]["policy"]["model"] == "Qwen/Qwen2.5-0.5B"
    assert (
        printed["model"]["class_path"] == yaml.safe_load((REPO / "configs" / method).read_text())["model"]["class_path"]
    )
