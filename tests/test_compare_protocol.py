"""Protocol v2 of ``ulma compare``: the shared base stage, the held-out set (other seeds, another data
draw), chain tuning by depth with grids that extend at their edges, and the reward model that starts
from the SFT model."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ulma_lightning.compare.runner import compare_main
from ulma_lightning.compare.spec import GridError, load_grid, tuning_keys
from ulma_lightning.compare.stages import plan_grid
from ulma_lightning.compare.tune import next_value, tune_chains

REPO = Path(__file__).resolve().parents[1]
LR = "model.init_args.optimizer.lr"
BETA = "model.init_args.beta"

GRID: dict[str, Any] = {
    "name": "v2",
    "seeds": [0],
    "data_seed": 0,
    "overrides": {
        "model.init_args.policy.tokenizer": "builtin:task",
        "trainer.max_steps": 1,
        "trainer.limit_val_batches": 1,
        "trainer.num_sanity_val_steps": 0,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "data.init_args.batch_size": 8,
    },
    "base": {
        "method": "sft",
        "train": "task://base?n=24&seed={data_seed}",
        "val": "task://base?split=val&n=8&seed={data_seed}",
        "overrides": {LR: 0.002},
    },
    "variants": {
        "ordinary": {
            "demonstration": "task://demonstration?n=24&seed={data_seed}",
            "pairwise": {"train": "task://pairwise?n=24&seed={data_seed}"},
            "binary": "task://binary?n=24&seed={data_seed}",
        },
        "golden": {
            "demonstration": "task://demonstration?variant=golden&n=24&seed={data_seed}",
            "pairwise": {"train": "task://pairwise?variant=golden&n=24&seed={data_seed}"},
            "binary": "task://binary?variant=golden&n=24&seed={data_seed}",
        },
    },
    "evaluation": {
        "prompts": "task://demonstration?split=test&n=8&stratified=true&seed={data_seed}",
        "scorer": {"class_path": "ulma_lightning.evaluation.TaskScorer"},
        "request_kind": "ulma_lightning.data.task.request_kind",
        "generation": {"max_new_tokens": 6},
        "kl_max_new_tokens": 6,
        "batch_size": 8,
    },
    "runs": [
        {"name": "sft", "stages": [{"method": "sft", "data": "demonstration"}]},
        {
            "name": "sft_dpo",
            "stages": [{"method": "sft", "data": "demonstration"}, {"method": "dpo", "data": "pairwise"}],
        },
        {"name": "ulma", "stages": [{"method": "ulma", "data": "binary"}]},
    ],
    "heldout": {"seeds": [3, 4], "data_seed": 1},
    "tune": {
        "prompts": "task://demonstration?split=val&n=8&seed={data_seed}",
        "seeds": [0, 1],
        "grid": {LR: [1.0e-4, 1.0e-3]},
        "methods": {"ulma": {BETA: [0.5, 1.0]}, "dpo": {BETA: [0.1]}, "sft>dpo": {BETA: [0.05, 0.1]}},
        "extend_edges": 2,
    },
}


def write(folder: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def in_repo(function, *args):
    cwd = os.getcwd()
    os.chdir(REPO)  # the grid names configs/ relative to the repository, as the README runs it
    try:
        return function(*args)
    finally:
        os.chdir(cwd)


def test_every_run_starts_from_one_shared_base_and_the_base_is_a_row(tmp_path: Path) -> None:
    grid = in_repo(load_grid, write(tmp_path, GRID))
    assert grid.runs[0].name == "base" and [s.method for s in grid.runs[0].stages] == ["sft"]
    assert all(run.stages[0] is grid.base for run in grid.runs)
    plan = plan_grid(grid)
    bases = {i.stages[0] for i in plan.instances}
    assert len(bases) == 1  # one seed: one base stage for every run and both variants
    (base,) = bases
    assert "task://base?n=24&seed=0" in plan.stages[base].base_args
    assert f"--{LR}" in plan.stages[base].base_args
    firsts = {i.stages[1] for i in plan.instances if i.run.name != "base"}
    assert all(plan.stages[k].policy_from == base for k in firsts)  # it is their start and their reference
    sft = {i.variant: i.stages[1] for i in plan.instances if i.run.name == "sft"}
    assert sft["ordinary"] != sft["golden"]
    dpo = next(i for i in plan.instances if i.run.name == "sft_dpo" and i.variant == "ordinary")
    assert dpo.stages[1] == sft["ordinary"]  # SFT then DPO shares the SFT row's stage
    assert tuning_keys(grid.run("sft_dpo").stages) == ["base", "sft", "sft>dpo"]


def test_a_stage_is_identified_by_what_it_trains_not_by_the_variants_name(tmp_path: Path) -> None:
    grid = copy.deepcopy(GRID)
    grid["variants"]["twin"] = copy.deepcopy(grid["variants"]["ordinary"])
    plan = plan_grid(in_repo(load_grid, write(tmp_path, grid)))
    by = {(i.run.name, i.variant): i.stages for i in plan.instances}
    assert by[("sft", "twin")] == by[("sft", "ordinary")]
    assert by[("sft", "golden")] != by[("sft", "ordinary")]


def test_the_heldout_set_takes_its_seeds_and_data_draw_everywhere(tmp_path: Path) -> None:
    path = write(tmp_path, GRID)
    main, held = in_repo(load_grid, path), in_repo(lambda: load_grid(path, heldout=True))
    assert main.seeds == [0] and held.seeds == [3, 4] and held.data_seed == 1
    assert "seed=0" in main.evaluation.prompts and "seed=1" in held.evaluation.prompts
    assert held.variants["golden"]["binary"]["train"].endswith("seed=1") and held.base.sources["val"].endswith("seed=1")
    assert held.tune.prompts.endswith("seed=1")
    no_heldout = {k: v for k, v in GRID.items() if k != "heldout"}
    with pytest.raises(GridError, match="heldout"):
        in_repo(lambda: load_grid(write(tmp_path, no_heldout, "plain.yaml"), heldout=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base": {"method": "sft"}}, "base needs `train:`"),
        ({"base": {"method": "reward", "train": "task://base"}}, "reward model"),
        ({"base": {"method": "sft", "train": "task://base", "epochs": 2}}, "unknown key"),
        ({"data_seed": "one"}, "data_seed must be an integer"),
        ({"heldout": {"seeds": [1], "draw": 2}}, "unknown key"),
        ({"tune": {**GRID["tune"], "extend_edges": -1}}, "extend_edges"),
        ({"tune": {**GRID["tune"], "methods": {"ulma": {BETA: []}}}}, "tune.methods.ulma"),
        (
            {"runs": [*GRID["runs"], {"name": "base", "stages": [{"method": "sft", "data": "demonstration"}]}]},
            "base stage's row",
        ),
    ],
)
def test_protocol_mistakes_are_named_before_training(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        in_repo(load_grid, write(tmp_path, {**GRID, **change}))


def test_the_reward_model_starts_from_the_sft_model_before_it(tmp_path: Path) -> None:
    grid = copy.deepcopy(GRID)
    ppo = {"method": "ppo", "data": "demonstration", "reward_arg": "model.init_args.scorer.init_args.path"}
    grid["evaluation"]["baseline"] = None
    grid["runs"] = [
        {
            "name": "rlhf",
            "stages": [{"method": "sft", "data": "demonstration"}, {"method": "reward", "data": "pairwise"}, ppo],
        }
    ]
    plan = plan_grid(in_repo(load_grid, write(tmp_path, grid)))
    instance = next(i for i in plan.instances if i.run.name == "rlhf")
    _, sft, reward, rl = (plan.stages[k] for k in instance.stages)
    assert reward.policy_from == sft.key and rl.policy_from == sft.key and rl.reward_from == reward.key
    args = reward.args(tmp_path, {sft.key: "/exports/sft", reward.key: "/exports/rm"})
    assert args[args.index("--model.init_args.policy.model") + 1] == "/exports/sft"
    assert "--model.init_args.policy.reference_model" not in args  # a reward model has no reference


def fake_results(grid, score) -> dict[str, Any]:
    """What compare returns for a candidates grid, with ``score(run name, seed)`` as validation score."""
    runs = [
        {"run": r.name, "seed": s, "status": "ok", "metrics": {"score": score(r.name, s)}}
        for r in grid.runs
        for s in grid.seeds
    ]
    return {"runs": runs}


def test_chain_tuning_goes_by_depth_from_the_picks_and_extends_edge_picks(tmp_path: Path) -> None:
    grid = in_repo(load_grid, write(tmp_path, GRID))
    seen: list[Any] = []

    def score(name: str, seed: int) -> float:
        # SFT prefers the largest lr (an edge: it extends twice, to 1e-2 and 1e-1), ULMA the middle beta,
        # DPO after SFT the smallest beta (extends down to 0.025, 0.0125); the seeds disagree a little
        lr = float(name.split("lr=")[1].split(",")[0].rstrip("]"))
        beta = float(name.split("beta=")[1].rstrip("]")) if "beta=" in name else 0.0
        if name.startswith("ulma"):
            return 0.5 - abs(beta - 1.0) - abs(lr - 1e-3) + 0.01 * seed
        if name.startswith("sft-dpo"):
            return 0.6 - beta - abs(lr - 1e-3)
        return lr + 0.001 * seed

    def run(candidates):
        seen.append(candidates)
        assert candidates.seeds == [0, 1] and candidates.tuned == {}
        assert candidates.evaluation.prompts == grid.tune.prompts and candidates.evaluation.golden is None
        return fake_results(candidates, score)

    tuned, log = tune_chains(grid, run)
    assert tuned["sft"] == {LR: 0.1}  # 1e-3 was the edge: +1e-2, then +1e-1 (extend_edges: 2)
    assert tuned["ulma"] == {LR: 1.0e-3, BETA: 1.0}
    assert tuned["sft>dpo"] == {LR: 1.0e-3, BETA: 0.0125}
    assert "dpo" not in tuned  # no run ends with DPO from the base
    sft_log = [e for e in log if e["key"] == "sft"]
    assert [e["extended"] for e in sft_log] == [True, True, False] and sft_log[-1]["values"][LR] == [
        1.0e-4,
        1.0e-3,
        1.0e-2,
        1.0e-1,
    ]
    # DPO after SFT is tuned after SFT, from SFT's pick, written into its SFT stage
    first_dpo = next(i for i, g in enumerate(seen) if any(r.name.startswith("sft-dpo") for r in g.runs))
    dpo_runs = [r for r in seen[first_dpo].runs if r.name.startswith("sft-dpo")]
    assert all(r.stages[1].overrides[LR] == 0.1 for r in dpo_runs)
    assert all(r.stages[0] is grid.base for r in dpo_runs)
    assert any(r.name.startswith("sft[") for r in seen[first_dpo].runs)  # earlier candidates stay in the table


@pytest.mark.parametrize(
    ("values", "at_start", "expected"),
    [
        ([1e-4, 1e-3], False, 1e-2),
        ([1e-4, 1e-3], True, 1e-5),
        ([0.05, 0.1, 0.5], False, 2.5),
        ([0.0, 0.1], True, None),
        ([1, 2], False, 4),
        (["a", "b"], False, None),
        ([0.1], False, None),
    ],
)
def test_next_value_follows_the_grids_step(values, at_start, expected) -> None:
    assert next_value(values, at_start) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.integration
def test_the_v2_grid_trains_base_rows_and_chains_end_to_end(tmp_path: Path, capfd) -> None:
    import logging

    level = logging.getLogger("lightning.pytorch").level
    grid = copy.deepcopy(GRID)
    grid["variants"] = {"ordinary": grid["variants"]["ordinary"]}
    grid["runs"] = [GRID["runs"][1]]  # SFT then DPO: base -> SFT -> DPO
    grid["evaluation"]["baseline"] = "base"
    results = in_repo(compare_main, ["--config", str(write(tmp_path, grid)), "--output", str(tmp_path / "out")])
    assert {r["id"]: r["status"] for r in results["runs"]} == {
        "base/ordinary/seed0": "ok",
        "sft_dpo/ordinary/seed0": "ok",
    }
    rows = results["tables"]["ordinary"]
    assert set(rows) == {"untrained", "base", "sft_dpo"}
    dpo = next(r for r in results["runs"] if r["run"] == "sft_dpo")
    assert [s["method"] for s in dpo["stages"]] == ["sft", "sft", "dpo"]
    assert [s["shared"] for s in dpo["stages"]] == [True, False, False]  # the base is shared with its own row
    said = capfd.readouterr()
    for noise in (
        "Loading weights",
        "Writing model shards",
        "GPU available",
        "Seed set to",
    ):  # progress bars off: quiet children
        assert noise not in said.out + said.err
    assert "[ulma compare] base/ordinary/seed0 done" in said.out
    assert logging.getLogger("lightning.pytorch").level == level  # put back for what runs next in this process


def stats(mean: float, std: float, n: int = 3) -> dict[str, float]:
    return {"mean": mean, "std": std, "n": n}


def test_error_bars_stay_inside_the_metrics_bounds() -> None:
    from ulma_lightning.compare.plots import error_bars

    below, above = error_bars([0.95, 0.02, 0.5], [0.1, 0.1, 0.1], "score")
    assert below == pytest.approx([0.1, 0.02, 0.1]) and above == pytest.approx([0.05, 0.1, 0.1])
    below, above = error_bars([5.0, 1.0e6], [1.0, 3.0e6], "golden_ppl")
    assert below[0] == 1.0 and 0 < 1.0e6 - below[1] < 1.0e6 and above[1] == 3.0e6  # never down to 0 on a log axis


def plot_results() -> dict[str, Any]:
    metrics = {"score": stats(0.6, 0.3), "golden_ppl": stats(3.0e5, 6.0e5), "kl": stats(1.0, 0.1)}
    rows = {"sft": {"label": "SFT", "seeds": 3, "failed": 0, "pending": 0, "metrics": metrics}}
    runs = [
        {
            "status": "ok",
            "run": "sft",
            "label": "SFT",
            "variant": "ordinary",
            "seed": s,
            "metrics": {"score": 0.5 + s / 10, "kl": 1.0 + s},
        }
        for s in range(3)
    ]
    return {"tables": {"ordinary": rows}, "runs": runs, "evaluation": {"baseline": None}}


def test_perplexity_on_a_log_axis_and_the_frontier_legend_outside_the_points() -> None:
    from ulma_lightning.compare.plots import bar_figure, frontier_figure

    results = plot_results()
    ppl = bar_figure(results, "golden_ppl", "golden perplexity")
    assert ppl.axes[0].get_yscale() == "log"
    score = bar_figure(results, "score", "score")
    assert score.axes[0].get_yscale() == "linear"
    lows = [line.get_ydata().min() for line in score.axes[0].lines if len(line.get_ydata())]
    highs = [line.get_ydata().max() for line in score.axes[0].lines if len(line.get_ydata())]
    assert min(lows) >= 0.0 and max(highs) <= 1.0  # 0.6 ± 0.3 is drawn as [0.3, 0.9]; no bar past 1
    fig = frontier_figure(results)
    fig.canvas.draw()
    axes, legend = fig.axes[0].get_window_extent(), fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, never over the points


def test_the_frontier_gives_every_row_its_own_colour_and_spreads_small_and_large_kl() -> None:
    """15 rows (the paper grid's) get 15 colours (the default cycle repeats after 10), and the x axis is
    symlog: KL near 0 for fine-tuned rows and 150 nats for the base must both stay readable."""
    from ulma_lightning.compare.plots import frontier_figure

    runs = [
        {
            "status": "ok",
            "run": f"r{i}",
            "label": f"R{i}",
            "variant": "ordinary",
            "seed": 0,
            "metrics": {"score": 0.5, "kl": 0.1 * i if i else 150.0},
        }
        for i in range(15)
    ]
    fig = frontier_figure({"tables": {"ordinary": {}}, "runs": runs, "evaluation": {"baseline": None}})
    ax = fig.axes[0]
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 15
    assert ax.get_xscale() == "symlog"


def test_bold_marks_a_best_only_among_finished_rows() -> None:
    from ulma_lightning.compare.report import table

    rows = {
        "a": {
            "label": "A",
            "seeds": 1,
            "failed": 0,
            "pending": 2,
            "metrics": {"score": stats(0.9, 0.0, 1)},
        },  # 2 seeds still to run
        "b": {"label": "B", "seeds": 3, "failed": 0, "pending": 0, "metrics": {"score": stats(0.7, 0.0)}},
        "c": {"label": "C", "seeds": 3, "failed": 0, "pending": 0, "metrics": {"score": stats(0.5, 0.0)}},
    }
    text = table(rows, [("score", "score", "higher")])
    assert "| A | 0.900" in text and "| B | **0.700" in text
