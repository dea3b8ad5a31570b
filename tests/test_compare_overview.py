"""``ulma compare --plan`` and the progress lines' ETA: estimates from what the output folder measured.

On SmolLM2 a run took ~8 min (an evaluation ~4 of them) while the ETA, from the tiny model's defaults
for the methods not yet run and for every evaluation, said "~1 min" with 4 runs (~16 min) left."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import GRID, write_grid

from ulma_lightning.compare.overview import DEFAULT_SECONDS, describe, eta_line, measured_seconds, remaining_seconds
from ulma_lightning.compare.report import RESULT_FILE, evaluation_key, init_folder, run_folder
from ulma_lightning.compare.spec import load_grid
from ulma_lightning.compare.stages import STAGE_FILE, plan_grid, write_json

REPO = Path(__file__).resolve().parents[1]
POLICY, EVALUATION = DEFAULT_SECONDS["policy"], DEFAULT_SECONDS["evaluation"]


@pytest.fixture
def planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The tiny grid (sft, sft then dpo, ulma; one seed): its plan, an empty output folder, and a
    writer of finished stages and evaluations."""
    monkeypatch.chdir(REPO)
    grid = load_grid(write_grid(tmp_path, GRID))
    plan = plan_grid(grid)
    root = tmp_path / "out"
    keys = {stage.spec.method: key for key, stage in plan.stages.items()}
    assert sorted(keys) == ["dpo", "sft", "ulma"]  # sft is shared by the sft and sft_dpo runs
    (init,) = {i.init for i in plan.instances}

    def finish_stage(method: str, seconds: float, **extra) -> None:
        write_json(root / "stages" / keys[method] / STAGE_FILE, {"status": "ok", "seconds": seconds, **extra})

    def finish_run(run_id: str, eval_seconds: float, key: str | None = None) -> None:
        result = {"status": "ok", "eval_seconds": eval_seconds, "evaluation_key": key or evaluation_key(grid)}
        write_json(run_folder(root, run_id) / RESULT_FILE, result)

    def finish_start() -> None:
        write_json(init_folder(root, init) / RESULT_FILE, {"status": "ok", "evaluation_key": evaluation_key(grid)})

    return grid, plan, root, finish_stage, finish_run, finish_start


def test_nothing_measured_uses_the_defaults(planned) -> None:
    grid, plan, root, *_ = planned
    # 3 stages, 3 runs' evaluations and the start model's
    assert remaining_seconds(grid, plan, root) == pytest.approx(3 * POLICY + 4 * EVALUATION)


def test_measured_stages_scale_the_methods_not_run_yet_and_evaluations_use_their_measured_time(planned) -> None:
    grid, plan, root, finish_stage, finish_run, finish_start = planned
    finish_stage("sft", 10 * POLICY)
    finish_run("sft/ordinary/seed0", 240.0)
    finish_start()

    # dpo and ulma at 10x their defaults (as sft measured), two evaluations at the measured 240 s
    assert remaining_seconds(grid, plan, root) == pytest.approx(2 * 300.0 + 2 * 240.0)
    assert remaining_seconds(grid, plan, root, ["broken/ordinary/seed0"]) == pytest.approx(300.0 + 240.0)
    assert eta_line(grid, plan, root, ["sft_dpo/ordinary/seed0", "broken/ordinary/seed0"], jobs=2) == "ETA ~9 min"

    text = describe(grid, plan, root, jobs=1)
    assert "sft/ordinary/seed0: sft (done)" in text and "sft_dpo/ordinary/seed0: sft -> dpo\n" in text
    assert text.count("; done") == 1 and text.count("; ~5 min") == 2  # sft done; dpo and ulma 300 s each
    assert "evaluations ~4 min each" in text
    assert "estimated time left: 18 min with 1 job(s)" in text


def test_the_start_models_evaluation_counts_until_it_is_done(planned) -> None:
    grid, plan, root, finish_stage, finish_run, finish_start = planned
    finish_stage("sft", 10 * POLICY)
    finish_run("sft/ordinary/seed0", 240.0)
    assert remaining_seconds(grid, plan, root) == pytest.approx(2 * 300.0 + 3 * 240.0)
    finish_start()
    assert remaining_seconds(grid, plan, root) == pytest.approx(2 * 300.0 + 2 * 240.0)


def test_results_under_other_evaluation_settings_count_as_not_evaluated(planned) -> None:
    """Changed `evaluation:` settings make `ulma compare` evaluate finished runs again: so does the ETA."""
    grid, plan, root, finish_stage, finish_run, finish_start = planned
    finish_stage("sft", 10 * POLICY)
    finish_run("sft/ordinary/seed0", 240.0, key="other-settings")
    finish_start()
    measured = measured_seconds(grid, plan, root)
    assert measured.evaluation is None and measured.evaluate() == pytest.approx(10 * EVALUATION)
    assert remaining_seconds(grid, plan, root) == pytest.approx(2 * 300.0 + 3 * 100.0)
    assert "sft/ordinary/seed0: sft (done)" not in describe(grid, plan, root)


def test_a_measured_method_keeps_its_own_mean_and_each_method_weighs_once(planned) -> None:
    grid, plan, root, finish_stage, *_ = planned
    finish_stage("sft", 2 * POLICY)
    finish_stage("dpo", 20 * POLICY)
    measured = measured_seconds(grid, plan, root)
    assert measured.stages == {"sft": 2 * POLICY, "dpo": 20 * POLICY}
    assert measured.stage("dpo", "policy") == 20 * POLICY
    factor = (2.0 * 20.0) ** 0.5  # the geometric mean of the two methods' ratios
    assert measured.factor == pytest.approx(factor)
    # ulma, not run: its default times the factor; 3 evaluations and the start model's at the default times it
    assert remaining_seconds(grid, plan, root) == pytest.approx(POLICY * factor + 4 * EVALUATION * factor)


def test_a_resumed_stage_measures_nothing(planned) -> None:
    """A stage resumed after a kill recorded only its last part (seconds after the restart)."""
    grid, plan, root, finish_stage, *_ = planned
    finish_stage("sft", 0.5, resumed_from="stages/sft/last.ckpt")
    measured = measured_seconds(grid, plan, root)
    assert measured.stages == {} and measured.factor == 1.0
    assert remaining_seconds(grid, plan, root) == pytest.approx(2 * POLICY + 4 * EVALUATION)
