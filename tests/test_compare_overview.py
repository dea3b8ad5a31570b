"""``ulma compare --plan`` and the progress lines' ETA: estimates from what the output folder measured.

On SmolLM2 a stage took ~8 min and an evaluation ~4 min while the ETA, from the tiny model's defaults
for the methods not yet run and for every evaluation, said "~1 min" with 4 runs (~16 min) left."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GRID, write_grid

from ulma_lightning.compare.overview import DEFAULT_SECONDS, describe, eta_line, remaining_seconds
from ulma_lightning.compare.report import RESULT_FILE, run_folder
from ulma_lightning.compare.spec import load_grid
from ulma_lightning.compare.stages import STAGE_FILE, plan_grid, write_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    grid = load_grid(write_grid(tmp_path, GRID))
    plan = plan_grid(grid)
    methods = {key: stage.spec.method for key, stage in plan.stages.items()}
    assert sorted(methods.values()) == ["dpo", "sft", "ulma"]  # sft is shared by the sft and sft_dpo runs
    return grid, plan, tmp_path / "out", methods


def test_nothing_measured_uses_the_defaults(planned) -> None:
    _, plan, root, _ = planned
    policy, evaluation = DEFAULT_SECONDS["policy"], DEFAULT_SECONDS["evaluation"]
    assert remaining_seconds(plan, root) == pytest.approx(3 * policy + 3 * evaluation)


def test_measured_stages_scale_the_methods_not_run_yet_and_evaluations_use_their_measured_time(planned) -> None:
    grid, plan, root, methods = planned
    sft = next(key for key, method in methods.items() if method == "sft")
    write_json(root / "stages" / sft / STAGE_FILE, {"status": "ok", "seconds": 10 * DEFAULT_SECONDS["policy"]})
    write_json(run_folder(root, "sft/ordinary/seed0") / RESULT_FILE, {"status": "ok", "eval_seconds": 240.0})

    # dpo and ulma at 10x their defaults (as sft measured), two evaluations at the measured 240 s
    expected = 2 * 10 * DEFAULT_SECONDS["policy"] + 2 * 240.0
    assert remaining_seconds(plan, root) == pytest.approx(expected)
    assert remaining_seconds(plan, root, ["broken/ordinary/seed0"]) == pytest.approx(300.0 + 240.0)
    assert eta_line(plan, root, ["sft_dpo/ordinary/seed0", "broken/ordinary/seed0"], jobs=2) == "ETA ~9 min"

    text = describe(grid, plan, root, jobs=1)
    assert f"{sft}: " in text and "; done" in text
    assert "~5 min" in text  # the dpo and ulma stages: 300 s each
    assert "evaluations ~4 min each" in text
    assert "estimated time left: 18 min with 1 job(s)" in text


def test_a_method_measured_keeps_its_own_mean(planned) -> None:
    _, plan, root, methods = planned
    for key, method in methods.items():
        if method in ("sft", "dpo"):
            seconds = 60.0 if method == "sft" else 600.0
            write_json(root / "stages" / key / STAGE_FILE, {"status": "ok", "seconds": seconds})
    # ulma, not run: its default times the geometric mean of 2x and 20x (6.32x); 3 evaluations at defaults x that
    factor = (2.0 * 20.0) ** 0.5
    expected = DEFAULT_SECONDS["policy"] * factor + 3 * DEFAULT_SECONDS["evaluation"] * factor
    assert remaining_seconds(plan, root) == pytest.approx(expected)
