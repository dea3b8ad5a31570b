"""``ulma compare``: a tiny grid of the shipped SFT and DPO configs on the demo task (a few steps),
its results files and plots, the SFT-then-DPO chain, resuming, failed runs, and the grid's errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import GRID, write_grid

from ulma_lightning.compare.runner import compare_main
from ulma_lightning.compare.spec import GridError, load_grid
from ulma_lightning.compare.stages import plan_grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny grid, run once through ``ulma compare`` (in this process, from the repository root)."""
    root = tmp_path_factory.mktemp("compare")
    grid = write_grid(root, {**GRID, "keep_checkpoints": True})  # the resume test below restarts from them
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        results = compare_main(["--config", str(grid), "--output", str(root / "out")])
    finally:
        os.chdir(cwd)
    return {"root": root, "grid": grid, "out": root / "out", "results": results}


def table_rows(markdown: str, variant: str) -> dict[str, dict[str, str]]:
    """The cells of the table under ``## variant``, by method label and column title."""
    section = markdown.split(f"## {variant}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


@pytest.mark.integration
def test_results_files_hold_each_runs_own_metrics(ran: dict) -> None:
    out = ran["out"]
    results = json.loads((out / "results.json").read_text())
    by_id = {r["id"]: r for r in results["runs"]}
    assert set(by_id) == {"sft/ordinary/seed0", "sft_dpo/ordinary/seed0", "broken/ordinary/seed0"}
    rows = table_rows((out / "results.md").read_text(), "ordinary")
    assert set(rows) == {"untrained", "sft", "SFT then DPO", "broken"}
    for run_id, label in (("sft/ordinary/seed0", "sft"), ("sft_dpo/ordinary/seed0", "SFT then DPO")):
        own = json.loads((out / "runs" / run_id / "result.json").read_text())
        assert own["status"] == "ok" and by_id[run_id]["metrics"]["score"] == own["metrics"]["score"]
        for column, key in (
            ("score", "score"),
            ("golden perplexity", "golden_ppl"),
            ("KL to reference", "kl"),
            ("tokens/s", "tokens_per_sec"),
            ("train time (s)", "train_seconds"),
        ):
            shown = float(rows[label][column].strip("*"))
            decimals = len(rows[label][column].strip("*").partition(".")[2])
            assert decimals >= {"train_seconds": 1, "tokens_per_sec": 0}.get(key, 2)
            assert shown == pytest.approx(own["metrics"][key], abs=0.51 * 10**-decimals), (label, column)
        # the score is the ground truth of the saved generations
        from ulma_lightning.evaluation import DemoScorer

        predictions = [
            json.loads(line) for line in (out / "runs" / run_id / "predictions.jsonl").read_text().splitlines()
        ]
        assert len(predictions) == 8
        truth = DemoScorer().score([p["prompt"] for p in predictions], [p["response"] for p in predictions])
        assert own["metrics"]["score"] == pytest.approx(sum(truth) / len(truth))
        # tokens/s is the value the last stage logged to TensorBoard
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        stage = Path(own["stages"][-1]["tensorboard"])
        events = EventAccumulator(str(next(stage.rglob("events.out.tfevents*")))).Reload()
        assert own["metrics"]["tokens_per_sec"] == pytest.approx(events.Scalars("train/tokens_per_sec_epoch")[-1].value)
        assert (out / "runs" / run_id / "model" / "config.json").is_file()
    # the baseline compared with itself ties everywhere; the untrained row has no KL to itself
    assert float(rows["sft"]["win rate vs sft"].strip("*")) == 0.5
    assert float(rows["untrained"]["KL to reference"].strip("*")) == 0.0


@pytest.mark.integration
def test_results_md_lists_the_shared_options_once_and_each_command_rebuilds_from_them(ran: dict) -> None:
    text = (ran["out"] / "results.md").read_text()
    shared = text.split("shared by every stage):\n\n```\n", 1)[1].split("\n```", 1)[0]
    assert "--trainer.max_steps 1" in shared and "--config" not in shared
    results = json.loads((ran["out"] / "results.json").read_text())
    for run in results["runs"]:
        for stage in run.get("stages", []):
            short = stage["command"].split(" --", 1)[0]  # ulma fit
            shown = next(line for line in text.splitlines() if line.startswith(f"| `{run['id']}`"))
            assert "--trainer.max_steps 1" not in shown
            # the full command is the shown one plus the shared options: same options, same values
            listed = [
                c.strip("`").removesuffix(" (shared)").strip("`")
                for c in shown.split(" | ")[-1].rstrip(" |").split("<br>")
            ]
            full = sorted(shlex.split(stage["command"])[2:])
            assert any(sorted(shlex.split(c)[2:] + shlex.split(shared)) == full for c in listed), short


@pytest.mark.integration
def test_plots_are_pngs(ran: dict) -> None:
    from PIL import Image

    plots = [Path(p) for p in ran["results"]["plots"]]
    names = {p.name for p in plots}
    assert {"bar_score.png", "bar_win_vs_sft.png", "bar_golden_ppl.png", "score_vs_kl.png"} <= names
    for path in plots:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.integration
def test_failed_run_is_recorded_and_others_go_on(ran: dict) -> None:
    markdown = (ran["out"] / "results.md").read_text()
    failed = markdown.split("## Failed runs", 1)[1]
    assert "`broken/ordinary/seed0` failed" in failed and "beta" in failed
    assert json.loads((ran["out"] / "runs/sft/ordinary/seed0/result.json").read_text())["status"] == "ok"


@pytest.mark.integration
def test_sft_then_dpo_starts_from_the_sft_model_and_uses_it_as_reference(ran: dict) -> None:
    out = ran["out"]
    result = json.loads((out / "runs/sft_dpo/ordinary/seed0/result.json").read_text())
    sft_stage, dpo_stage = result["stages"]
    sft_only = json.loads((out / "runs/sft/ordinary/seed0/result.json").read_text())["stages"][0]
    assert sft_stage["key"] == sft_only["key"] and sft_stage["shared"]  # one SFT stage for both rows
    assert len(list((out / "stages").glob("sft-*"))) == 1
    saved = yaml.safe_load(
        next(Path(dpo_stage["tensorboard"]).rglob("config.yaml")).read_text()
    )  # what `ulma fit` ran with
    policy = saved["model"]["init_args"]["policy"]
    assert Path(policy["model"]) == Path(sft_stage["export"]) and Path(policy["reference_model"]) == Path(
        sft_stage["export"]
    )
    assert saved["model"]["class_path"].endswith("DPOModule")
    assert f"--model.init_args.policy.reference_model {sft_stage['export']}" in dpo_stage["command"]


@pytest.mark.integration
def test_stages_share_tokenized_data_through_the_output_cache_outside_their_identity(ran: dict) -> None:
    out = ran["out"]
    cache = out / "cache" / "features"
    sft = json.loads((out / "runs/sft/ordinary/seed0/result.json").read_text())["stages"][0]
    dpo = json.loads((out / "runs/sft_dpo/ordinary/seed0/result.json").read_text())["stages"][1]
    for stage in (sft, dpo):
        assert f"--data.init_args.cache_dir {cache}" in stage["command"]
    assert len(list(cache.glob("features-*.pt"))) >= 3  # SFT train + val, DPO train (+ val)
    plan = plan_grid(load_grid(ran["grid"]))
    for key, stage in plan.stages.items():
        assert not any("cache_dir" in arg for arg in stage.base_args)  # the stage key hashes base_args
        assert f"--data.init_args.cache_dir {cache}" in shlex.join(
            stage.args(out / "stages" / key, {k: "x" for k in plan.stages}, cache_dir=cache)
        )
    assert sft["key"] in plan.stages and dpo["key"] in plan.stages
    own = yaml.safe_load(ran["grid"].read_text())
    own["overrides"]["data.init_args.cache_dir"] = None  # a grid that sets it (here: no cache) keeps its own
    path = write_grid(ran["root"], own, "own_cache.yaml")
    own_plan = plan_grid(load_grid(path))
    for stage in own_plan.stages.values():
        args = stage.args(out, {k: "x" for k in own_plan.stages}, cache_dir=cache)
        assert (
            args.count("--data.init_args.cache_dir") == 1
            and args[args.index("--data.init_args.cache_dir") + 1] == "null"
        )


@pytest.mark.integration
def test_rerun_skips_finished_runs_and_resumes_the_stage_in_progress(
    ran: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    shutil.copytree(ran["out"], out, symlinks=True)
    sft_dpo = out / "runs/sft_dpo/ordinary/seed0"
    dpo_key = json.loads((sft_dpo / "result.json").read_text())["stages"][1]["key"]
    # as if killed while the DPO stage ran: its checkpoint is there, its done marker and the run's are not
    (sft_dpo / "result.json").unlink()
    (out / "stages" / dpo_key / "stage.json").unlink()
    finished = out / "runs/sft/ordinary/seed0/result.json"
    before = (
        finished.stat().st_mtime_ns,
        (out / "stages" / json.loads(finished.read_text())["stages"][0]["key"] / "stage.json").stat().st_mtime_ns,
    )
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        compare_main(["--config", str(ran["grid"]), "--output", str(out), "--only", "sft_dpo"])
    finally:
        os.chdir(cwd)
    log = capsys.readouterr().out
    assert "running sft_dpo/ordinary/seed0" in log and "running sft/" not in log
    after = (
        finished.stat().st_mtime_ns,
        (out / "stages" / json.loads(finished.read_text())["stages"][0]["key"] / "stage.json").stat().st_mtime_ns,
    )
    assert after == before  # the finished run and its SFT stage were not redone
    stage = json.loads((out / "stages" / dpo_key / "stage.json").read_text())
    assert stage["resumed_from"] and stage["resumed_from"].endswith("last.ckpt")
    assert f"--ckpt_path {stage['resumed_from']}" in stage["command"]
    assert json.loads((sft_dpo / "result.json").read_text())["status"] == "ok"
    # the other run is still in the results, from its earlier result
    assert "sft/ordinary/seed0" in {
        r["id"] for r in json.loads((out / "results.json").read_text())["runs"] if r["status"] == "ok"
    }


# ----------------------------------------------------------------------------- bad grids
def _bad(grid_update: dict) -> dict:
    grid = json.loads(json.dumps(GRID))
    grid.update(grid_update)
    return grid


BAD_GRIDS = {
    "unknown method": (
        {"runs": [{"name": "mystery", "stages": [{"method": "ppo2", "data": "pairwise"}]}]},
        r"grid\.yaml:\d+: runs\[0\] 'mystery' stage 1: unknown method 'ppo2'; known methods .*dpo.*sft",
    ),
    "missing config": (
        {"runs": [{"name": "mine", "stages": [{"config": "configs/nope.yaml", "data": "pairwise"}]}]},
        r"grid\.yaml:\d+: runs\[0\] 'mine' stage 1: config file 'configs/nope.yaml' does not exist",
    ),
    "duplicated name": (
        {"runs": [GRID["runs"][0], GRID["runs"][0]]},
        r"grid\.yaml:\d+: runs\[1\] 'sft': duplicated run name \(also at line \d+\)",
    ),
    "reward model last": (
        {"runs": [{"name": "rm", "stages": [{"method": "reward", "data": "pairwise"}]}]},
        r"runs\[0\] 'rm': the last stage \(reward\) trains a reward model",
    ),
    "reward model into DPO": (
        {
            "runs": [
                {
                    "name": "rlhf",
                    "stages": [{"method": "reward", "data": "pairwise"}, {"method": "dpo", "data": "pairwise"}],
                }
            ]
        },
        r"runs\[0\] 'rlhf': stage 'dpo' .* follows the reward model of stage 'reward' "
        r"but takes no `reward_model` argument",
    ),
    "jobs below one": (
        {"jobs": 0},
        r"grid\.yaml:\d+: jobs must be a whole number >= 1 \(runs trained at a time\), got 0",
    ),
    # issue 26, item 4: a variant name is a folder of the output, like a run name
    "variant name escapes the output": (
        {"variants": {"../../../victim": GRID["variants"]["ordinary"]}},
        r"grid\.yaml:\d+: variants\.\.\./\.\./\.\./victim: a variant name cannot .* start with '\.' "
        r"\(it names a folder of the output\)",
    ),
    "method name escapes the stages folder": (
        {"runs": [{"name": "sft", "stages": [{"method": "../configs/sft", "data": "demonstration"}]}]},
        r"grid\.yaml:\d+: runs\[0\] 'sft' stage 1: a method name \(use `config: FILE` for a config elsewhere\) cannot",
    ),
    # issue 26, item 10: evaluation options are type-checked before training
    "evaluation option of the wrong type": (
        {"evaluation": {**GRID["evaluation"], "max_prompts": "ten"}},
        r"grid\.yaml:\d+: evaluation\.max_prompts must be a whole number or null, got str 'ten'",
    ),
    "evaluation number out of range": (
        {"evaluation": {**GRID["evaluation"], "batch_size": 0}},
        r"grid\.yaml:\d+: evaluation\.batch_size must be >= 1, got 0",
    ),
    "data kind missing": (
        {"runs": [{"name": "ulma", "stages": [{"method": "ulma_continuous", "data": "continuous"}]}]},
        r"runs\[0\] 'ulma' stage 1 \(ulma_continuous\): data kind 'continuous' is not defined in variant 'ordinary'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid_stops_before_training_naming_the_entry(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    update, message = BAD_GRIDS[case]
    grid = write_grid(tmp_path, _bad(update))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.raises(SystemExit) as exit_info:
            compare_main(["--config", str(grid), "--output", str(tmp_path / "out")])
    finally:
        os.chdir(cwd)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err), case
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_ulma_compare_cli_reports_a_bad_grid(tmp_path: Path) -> None:
    grid = write_grid(tmp_path, _bad({"runs": [GRID["runs"][0], GRID["runs"][0]]}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", "compare", "--config", str(grid)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "duplicated run name" in done.stderr and f"{grid}:" in done.stderr


def test_paper_grid_is_valid_and_shares_its_sft_stages() -> None:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        grid = load_grid("experiments/paper.yaml")
        quick = load_grid("experiments/paper.yaml", quick=True)
    finally:
        os.chdir(cwd)
    assert len(grid.seeds) >= 3 and len(quick.seeds) == 1
    names = {r.name for r in grid.runs}
    assert {
        "sft",
        "sft_dpo",
        "dpo",
        "pointwise_dpo",
        "ulma",
        "unlikelihood",
        "kto",
        "pointwise_dpo_continuous",
        "ulma_continuous",
    } <= names
    plan = plan_grid(grid)
    assert len(plan.instances) == sum(len(r.variants) for r in grid.runs) * len(grid.seeds)
    bases = {i.stages[0] for i in plan.instances}
    assert len(bases) == len(grid.seeds)  # protocol v2: one base per seed, the first stage of every run
    sft_stages = [k for k in plan.stages if k.startswith("sft-") and k not in bases]
    assert len(sft_stages) == len(grid.variants) * len(grid.seeds)  # one SFT per variant and seed
    assert {r.name for r in quick.runs} < names


@pytest.mark.integration
def test_tune_keeps_the_best_validation_score_per_method_and_the_grid_uses_it(tmp_path: Path) -> None:
    grid = json.loads(json.dumps(GRID))
    grid["runs"] = [GRID["runs"][0]]  # SFT: it takes lr, not beta
    grid["tune"] = {
        "prompts": "demo://demonstration?split=val&n=6",
        "grid": {"model.init_args.optimizer.lr": [1.0e-3, 2.0e-2], "model.init_args.beta": [0.1]},
    }
    path = write_grid(tmp_path, grid)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        results = compare_main(["--config", str(path), "--output", str(tmp_path / "out"), "--tune"])
        scores = {r["run"]: r["metrics"]["score"] for r in results["runs"]}
        assert set(scores) == {"sft[lr=0.001]", "sft[lr=0.02]"}  # beta is not an SFT option
        assert results["evaluation"]["prompts"] == grid["tune"]["prompts"]  # chosen on validation prompts
        tuned = yaml.safe_load((tmp_path / "out/tune/tuned.yaml").read_text())["tuned"]
        best = max(scores, key=lambda name: (scores[name], name == "sft[lr=0.001]"))  # ties: the first
        assert tuned == {"sft": {"model.init_args.optimizer.lr": float(best[len("sft[lr=") : -1])}}
        # committed into the grid, the value reaches every SFT stage's command
        grid["tuned"] = tuned
        plan = plan_grid(load_grid(write_grid(tmp_path, grid, "tuned.yaml")))
    finally:
        os.chdir(cwd)
    (stage,) = plan.stages.values()
    assert stage.base_args[stage.base_args.index("--model.init_args.optimizer.lr") + 1] == str(
        tuned["sft"]["model.init_args.optimizer.lr"]
    )


def test_kl_is_the_mean_summed_log_ratio_of_the_policys_samples(tmp_path: Path, demo_tokenizer) -> None:
    import torch
    from conftest import TINY_LLAMA
    from transformers import AutoConfig, AutoModelForCausalLM

    from ulma_lightning.compare.metrics import Evaluator, load_model
    from ulma_lightning.compare.spec import EvaluationSpec
    from ulma_lightning.data.prompts import LeftPaddingCollator

    tok = demo_tokenizer
    for seed in (0, 1):  # two different random models, saved as `ulma fit` exports them
        torch.manual_seed(seed)
        config = AutoConfig.for_model(
            **TINY_LLAMA, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / f"m{seed}")
        tok.save_pretrained(tmp_path / f"m{seed}")
    evaluator = Evaluator(
        EvaluationSpec(prompts="demo://demonstration?split=test&n=4", kl_max_new_tokens=5, batch_size=4), seed=3
    )
    policy, reference = load_model(str(tmp_path / "m0")), load_model(str(tmp_path / "m1"))
    items = evaluator.prompts(str(tmp_path / "m0"))
    estimate = evaluator.kl(policy, reference, tok, items)
    assert evaluator.kl(policy, policy, tok, items) == 0.0
    # the same samples, scored independently: full-vocabulary log-softmax of each unpadded sequence
    torch.manual_seed(3)
    batch = LeftPaddingCollator(tok.pad_token_id)(items)
    out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=5, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)  # fmt: skip
    ratios = []
    for item, new in zip(items, out[:, batch["input_ids"].shape[1] :].tolist()):
        response = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
        ids = torch.tensor([list(item["input_ids"]) + response])
        n = len(item["input_ids"])
        with torch.no_grad():
            logps = [
                m(ids).logits.log_softmax(-1)[0, n - 1 : -1].gather(-1, ids[0, n:, None]).sum()
                for m in (policy, reference)
            ]
        ratios.append(float(logps[0] - logps[1]))
    assert estimate == pytest.approx(sum(ratios) / len(ratios), abs=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("interruption", ["sigterm", "ctrl-c"])
def test_an_interrupted_fit_stops_the_compare_instead_of_failing_the_run(
    interruption: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning ends a fit early on SIGTERM (and exits 1 after Ctrl-C): that is a kill of
    ``ulma compare``, to be resumed, not a failed run to record and step over."""
    import types

    import ulma_lightning.cli

    def interrupted_fit(args: list[str]) -> object:
        if interruption == "ctrl-c":
            raise SystemExit(1)
        return types.SimpleNamespace(trainer=types.SimpleNamespace(received_sigterm=True))

    monkeypatch.setattr(ulma_lightning.cli, "main", interrupted_fit)
    grid = json.loads(json.dumps(GRID))
    grid["runs"] = GRID["runs"][:2]
    path = write_grid(tmp_path, grid)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        compare_main(["--config", str(path), "--output", str(tmp_path / "out")])
    assert stop.value.code != 2  # not a grid error
    assert not list((tmp_path / "out").rglob("result.json")) and not list((tmp_path / "out").rglob("stage.json"))


@pytest.mark.integration
def test_new_evaluation_settings_reevaluate_without_retraining(ran: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(ran["out"], out, symlinks=True)
    grid = json.loads(json.dumps(GRID))
    grid["evaluation"]["max_prompts"] = 3
    path = write_grid(tmp_path, grid)
    sft = out / "runs/sft/ordinary/seed0"
    stage_file = out / "stages" / json.loads((sft / "result.json").read_text())["stages"][0]["key"] / "stage.json"
    trained = stage_file.stat().st_mtime_ns
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        results = compare_main(["--config", str(path), "--output", str(out), "--only", "sft"])
    finally:
        os.chdir(cwd)
    assert len((sft / "predictions.jsonl").read_text().splitlines()) == 3 and stage_file.stat().st_mtime_ns == trained
    status = {r["id"]: r["status"] for r in results["runs"]}
    assert (
        status["sft/ordinary/seed0"] == "ok" and status["sft_dpo/ordinary/seed0"] == "pending"
    )  # its numbers were for 8 prompts


HOLD_LOCK_SCRIPT = """
import sys, time
from pathlib import Path
from ulma_lightning.compare.runner import output_lock

with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.integration
def test_a_second_compare_into_the_same_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_LOCK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE, text=True
    )  # a live compare holds it
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        path = write_grid(tmp_path, GRID)
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            with pytest.raises(SystemExit) as stop:
                compare_main(["--config", str(path), "--output", str(out)])
        finally:
            os.chdir(cwd)
    finally:
        holder.kill()
        holder.wait()
    assert stop.value.code == 2
    assert f"another ulma compare (process {holder.pid}) is writing here" in capsys.readouterr().err
    assert not (out / "stages").exists()


def test_the_output_lock_admits_one_of_many_entering_at_once(tmp_path: Path) -> None:
    """Issue 26, item 5: the lock was read-then-write, so two processes entering at once could both
    hold it (and the same process twice). Now one OS lock: exactly one of the contenders gets in."""
    import threading

    from ulma_lightning.compare.runner import output_lock
    from ulma_lightning.compare.spec import GridError

    start, inside, refused = threading.Barrier(8), [], []

    def contend() -> None:
        start.wait()
        try:
            with output_lock(tmp_path / "out"):
                inside.append(1)
                time.sleep(1.0)
        except GridError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(inside), len(refused)) == (1, 7)
    with output_lock(tmp_path / "out"):  # freed at the end: the next compare takes it
        pass


def _grid_of_failing_runs() -> dict:
    grid = json.loads(json.dumps(GRID))
    grid["evaluation"]["baseline"] = "broken"
    grid["runs"] = [
        GRID["runs"][2],
        {"name": "typo", "stages": [{"method": "sft", "data": "demonstration", "overrides": {"trainer.max_stepz": 1}}]},
    ]
    return grid


@pytest.mark.integration
def test_failed_runs_end_with_a_nonzero_status_and_keep_their_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 26, item 10: `ulma compare` exited 0 when runs failed, and a refused option was recorded
    as 12 lines of usage text without the parser's `unrecognized arguments` line."""
    from ulma_lightning.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--config", str(write_grid(tmp_path, _grid_of_failing_runs())), "--output", str(out)])
    assert stop.value.code == 1
    assert (
        "2 of 2 runs failed (broken/ordinary/seed0, typo/ordinary/seed0); their errors are in results.md"
        in capsys.readouterr().err
    )
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# tiny: results\n")
    failed = markdown.split("## Failed runs", 1)[1].split("\n## ", 1)[0]
    assert re.search(
        r"`typo/ordinary/seed0` failed:\s+RuntimeError: `ulma fit` refused its options: error: "
        r".*unrecognized arguments: --trainer\.max_stepz 1",
        failed,
    ), failed
    assert "usage:" not in failed and "[--trainer" not in failed


@pytest.mark.integration
def test_a_folder_compare_did_not_write_is_refused_unless_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 26, item 3: compare replaced a user's own results.md in an existing folder without a word."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("my own notes\n")
    grid = write_grid(tmp_path, {**_grid_of_failing_runs(), "runs": [GRID["runs"][2]]})
    with pytest.raises(SystemExit) as stop:
        compare_main(["--config", str(grid), "--output", str(out)])
    assert stop.value.code == 2
    assert f"--output {out} is a folder that ulma compare did not write, and it is not empty" in capsys.readouterr().err
    assert (out / "results.md").read_text() == "my own notes\n" and sorted(p.name for p in out.iterdir()) == [
        "results.md"
    ]
    compare_main(["--config", str(grid), "--output", str(out), "--overwrite"])  # asked: written there
    assert (out / "results.md").read_text().startswith("# tiny: results")
    compare_main(["--config", str(grid), "--output", str(out)])  # now compare's own folder: resumed without asking


def test_the_main_run_writes_beside_its_own_tuning(tmp_path: Path) -> None:
    """README's order, `--tune` and then the grid into the same --output: the folder then holds only
    the tuning's `tune/`, which compare wrote, so the main run goes on; a user's file beside it, or a
    `tune/` compare did not write, is still refused."""
    from ulma_lightning.compare.runner import LOCK_FILE, GridError, check_output

    out = tmp_path / "paper"
    out.mkdir()
    (out / "tune").write_text("a file of the user's, named tune\n")
    with pytest.raises(GridError, match="did not write"):
        check_output(out)
    (out / "tune").unlink()
    (out / "tune").mkdir()
    with pytest.raises(GridError, match="did not write"):
        check_output(out)  # a tune/ of the user's own
    (out / "tune" / LOCK_FILE).write_text("")
    check_output(out)
    (out / "notes.md").write_text("mine\n")
    with pytest.raises(GridError, match="did not write"):
        check_output(out)


def test_a_stage_resumes_from_its_newest_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 26, item 11: with `last.ckpt` taken, Lightning writes the newer `last-v1.ckpt`; the
    stage resumed from the stale `last.ckpt`."""
    from ulma_lightning.compare import stages

    monkeypatch.chdir(REPO)
    plan = plan_grid(load_grid(write_grid(tmp_path, {**GRID, "runs": GRID["runs"][:1]})))
    stage = next(iter(plan.stages.values()))
    checkpoints = tmp_path / "stages" / stage.key / "tensorboard" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"old")
    os.utime(checkpoints / "last.ckpt", (time.time() - 60, time.time() - 60))
    (checkpoints / "last-v1.ckpt").write_bytes(b"new")
    (checkpoints / ".last-v2.ckpt.partial").write_bytes(b"unfinished")
    launched: list[list[str]] = []

    def launch(args: list[str], launcher: str, log_file: Path) -> None:
        launched.append(args)
        raise RuntimeError("not trained in this test")

    monkeypatch.setattr(stages, "launch", launch)
    with pytest.raises(RuntimeError, match="not trained"):
        stages.train_stage(stage, tmp_path, {}, "inprocess")
    resume = launched[0][launched[0].index("--ckpt_path") + 1]
    assert resume == str(checkpoints / "last-v1.ckpt")


@pytest.mark.parametrize("keep", [False, True])
def test_a_finished_stage_deletes_its_checkpoints_unless_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    """A real model's stage writes ~3 GB of checkpoints (optimizer state included) that only a killed
    stage needs: once the stage is recorded done they go, files and sharded folders alike."""
    from ulma_lightning.compare import stages

    monkeypatch.chdir(REPO)
    grid = load_grid(write_grid(tmp_path, {**GRID, "runs": GRID["runs"][:1], "keep_checkpoints": keep}))
    assert grid.keep_checkpoints is keep
    stage = next(iter(plan_grid(grid).stages.values()))
    version = tmp_path / "stages" / stage.key / "tensorboard" / "version_0"

    def launch(args: list[str], launcher: str, log_file: Path) -> None:  # a fit: checkpoints, then the export
        (version / "checkpoints").mkdir(parents=True)
        (version / "checkpoints" / "last.ckpt").write_bytes(b"state")
        (version / "checkpoints" / "epoch=0-step=2.ckpt" / "shard").mkdir(parents=True)  # an FSDP2 save
        (version / "hf_model").mkdir()
        (version / "hf_model" / "config.json").write_text("{}")

    monkeypatch.setattr(stages, "launch", launch)
    record = stages.train_stage(stage, tmp_path, {}, "inprocess", keep_checkpoints=grid.keep_checkpoints)
    left = sorted(p.name for p in version.rglob("*.ckpt"))
    assert left == (["epoch=0-step=2.ckpt", "last.ckpt"] if keep else [])
    assert record["checkpoints"] == ("kept" if keep else "deleted")
    assert (version / "hf_model" / "config.json").is_file() and record["export"] == str(version / "hf_model")
    assert json.loads((version.parents[1] / "stage.json").read_text())["status"] == "ok"


def test_keep_checkpoints_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="keep_checkpoints must be true or false, got 'yes'"):
        load_grid(write_grid(tmp_path, {**GRID, "keep_checkpoints": "yes"}))


ORPHAN_FIT_SCRIPT = """
import os, sys, threading, time
from pathlib import Path
from ulma_lightning.compare import stages

stages.child_command = lambda args: [sys.executable, "-c", "import time; time.sleep(120)"]  # a long `ulma fit`
threading.Thread(target=stages.launch, args=(["fit"], "subprocess", Path(sys.argv[1])), daemon=True).start()
time.sleep(2)
print(
    " ".join(
        c for task in Path(f"/proc/{os.getpid()}/task").iterdir() for c in (task / "children").read_text().split()
    ),
    flush=True,
)
os.kill(os.getpid(), 9)  # the compare is killed outright: no cleanup runs
"""


@pytest.mark.integration
def test_a_killed_compare_leaves_no_subprocess_fit_running(tmp_path: Path) -> None:
    """Issue 26, item 12: `--launcher subprocess` left its `ulma fit` running after the compare was
    killed; the rerun then trained the same stage beside it."""
    script = tmp_path / "orphan_fit.py"
    script.write_text(ORPHAN_FIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fit.log")], env=env, capture_output=True, text=True, timeout=120
    )
    children = [int(pid) for pid in done.stdout.split()]
    assert children, done.stderr
    alive = []
    for child in children:
        for _ in range(50):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            alive.append(child)
            os.kill(child, 9)
    assert not alive, f"fit process(es) {alive} outlived the killed compare"


@pytest.mark.integration
def test_jobs_run_instances_in_parallel_and_train_a_shared_stage_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = write_grid(tmp_path, {**GRID, "runs": GRID["runs"][:2], "jobs": 2})  # sft and sft_dpo share the SFT stage
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        results = compare_main(["--config", str(grid), "--output", str(tmp_path / "out")])  # the grid's jobs: 2
    finally:
        os.chdir(cwd)
    assert "2 runs on 2 worker processes" in capsys.readouterr().out
    assert [r["status"] for r in results["runs"]] == ["ok", "ok"]
    sft_keys = {
        r["stages"][0]["key"]
        for r in (
            json.loads((tmp_path / "out/runs" / name / "ordinary/seed0/result.json").read_text())
            for name in ("sft", "sft_dpo")
        )
    }
    assert len(sft_keys) == 1
    # trained once, though both workers needed it: one fit wrote one TensorBoard event file (a second
    # fit, from another process, would add its own, named after its process id)
    event_files = list((tmp_path / "out/stages" / sft_keys.pop()).glob("**/events.out.tfevents.*"))
    assert len(event_files) == 1, event_files


def test_jobs_below_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        compare_main(["--config", str(write_grid(tmp_path, GRID)), "--output", str(tmp_path / "out"), "--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err


ORPHAN_SCRIPT = """
import multiprocessing, os, sys, time
from ulma_lightning.compare.parallel import _exit_with_parent

def worker(parent):
    _exit_with_parent(parent, interval=0.1)
    time.sleep(120)  # a long stage

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=worker, args=(os.getpid(),))
    child.start()
    time.sleep(3)
    print(child.pid, flush=True)
    os.kill(os.getpid(), 9)  # the compare is killed outright: no cleanup runs
"""


@pytest.mark.integration
def test_a_killed_compare_leaves_no_worker_training(tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    child = int(done.stdout.split()[0])
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    raise AssertionError(f"worker {child} outlived its killed parent")
