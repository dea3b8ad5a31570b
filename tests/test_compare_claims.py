"""Protocol v2's statistics: the paired bootstrap effect and its verdict rule by hand, and
experiments/claims.py on hand-made result folders (main and held-out sets)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ulma_lightning.compare.stats import NO_EFFECT, Effect, paired_effect, verdict

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("claims", REPO / "experiments" / "claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def test_a_constant_difference_has_a_point_interval() -> None:
    a = np.full((3, 50), 0.7)
    effect = paired_effect(a, a - 0.1)
    assert effect.mean == pytest.approx(0.1) and effect.low == pytest.approx(0.1) and effect.high == pytest.approx(0.1)
    assert (effect.seeds, effect.prompts) == (3, 50)


def test_the_interval_matches_the_spread_of_prompts_and_seeds() -> None:
    rng = np.random.default_rng(1)
    b = rng.uniform(size=(3, 400))
    noisy = b + 0.05 + rng.normal(0, 0.3, size=b.shape)  # a true effect of 0.05, noise 0.3 per prompt
    effect = paired_effect(noisy, b)
    half = 1.96 * 0.3 / math.sqrt(1200)  # the prompts' standard error alone
    assert effect.low < 0.05 < effect.high
    assert 0.8 * half < (effect.high - effect.low) / 2 < 2.5 * half
    seed_shift = b + np.array([[0.2], [0.0], [-0.1]])  # the seeds disagree: a wide interval across 0
    wide = paired_effect(seed_shift, b)
    assert wide.mean == pytest.approx(0.1 / 3) and wide.low < 0 < wide.high
    with pytest.raises(ValueError, match="one shape"):
        paired_effect(np.zeros((2, 3)), np.zeros((3, 3)))


@pytest.mark.parametrize(
    ("main", "heldout", "kind", "expected"),
    [
        ((0.05, 0.02, 0.08), (0.04, 0.01, 0.07), "beats", "supported"),
        ((0.05, 0.02, 0.08), (0.01, -0.02, 0.04), "beats", "not supported"),  # the held-out interval holds 0
        ((0.05, 0.02, 0.08), (-0.04, -0.07, -0.01), "beats", "contradicted"),
        ((0.05, 0.02, 0.08), None, "beats", "supported on the main set only (no held-out set)"),
        ((-0.01, -0.015, 0.0), (0.0, -0.01, 0.01), "at_least", "supported"),  # above -0.02 on both
        ((-0.05, -0.07, -0.03), (0.0, -0.01, 0.01), "at_least", "contradicted"),
        ((0.0, -0.01, 0.01), (0.005, -0.015, 0.019), "equivalent", "supported"),
        ((0.0, -0.03, 0.01), (0.0, -0.01, 0.01), "equivalent", "not supported"),
    ],
)
def test_verdict_rule(main, heldout, kind: str, expected: str) -> None:
    def make(t):
        return None if t is None else Effect(*t, 3, 100)

    assert verdict(make(main), make(heldout), kind, margin=0.02) == expected
    assert verdict(NO_EFFECT, make(heldout), kind, 0.02) == "not run"


def write_set(
    root: Path, scores: dict[tuple[str, str], np.ndarray], ppl: dict[tuple[str, str], list[float]] | None = None
) -> Path:
    """A results.json and per-run predictions.jsonl as ulma compare writes them."""
    runs = []
    for (run, variant), matrix in scores.items():
        for seed, row in enumerate(matrix):
            run_id = f"{run}/{variant}/seed{seed}"
            folder = root / "runs" / run_id
            folder.mkdir(parents=True)
            folder.joinpath("predictions.jsonl").write_text(
                "".join(json.dumps({"prompt": "p", "response": "r", "score": float(s)}) + "\n" for s in row)
            )
            metrics = {"score": float(np.mean(row))}
            if ppl and (run, variant) in ppl:
                metrics["golden_ppl"] = ppl[(run, variant)][seed]
            runs.append(
                {
                    "id": run_id,
                    "run": run,
                    "variant": variant,
                    "seed": seed,
                    "status": "ok",
                    "metrics": metrics,
                    "dir": str(folder),
                }
            )
    runs.append(
        {"id": "kto/ordinary/seed0", "run": "kto", "variant": "ordinary", "seed": 0, "status": "failed", "metrics": {}}
    )
    path = root / "results.json"
    path.write_text(json.dumps({"runs": runs, "command": "ulma compare --config experiments/paper.yaml"}))
    return path


def test_claims_pair_per_prompt_on_both_sets(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=(3, 120))

    def one_set(folder: Path, shift: float) -> Path:
        return write_set(
            folder,
            {
                ("ulma", "ordinary"): base + 0.10,
                ("sft", "ordinary"): base + shift,  # main: ULMA +0.1 over SFT; held-out: shift decides
                ("dpo", "ordinary"): base,
                ("pointwise_dpo", "ordinary"): base - 0.005,  # within the 0.02 margin of DPO
                ("ulma", "golden"): base + 0.30,
                ("sft", "golden"): base + 0.10,
                ("dpo", "golden"): base + 0.25,
                ("pointwise_dpo", "golden"): base + 0.2,
            },
            ppl={("ulma", "ordinary"): [5.0, 6.0, 7.0], ("pointwise_dpo", "ordinary"): [9.0, 9.0, 8.0]},
        )

    main, held = one_set(tmp_path / "main", 0.0), one_set(tmp_path / "held", 0.2)
    rows = {
        (c, v): (m, h, verdict) for c, v, m, h, verdict in claims.claims(claims.Results(main), claims.Results(held))
    }
    assert rows[("ULMA beats sft", "ordinary")] == (
        "+0.100 [+0.100, +0.100]",
        "-0.100 [-0.100, -0.100]",
        "contradicted",
    )
    assert rows[("ULMA beats dpo", "ordinary")][2] == "supported"
    assert rows[(f"point-wise DPO is at least as good as DPO (margin {claims.MARGIN})", "ordinary")][2] == "supported"
    assert rows[("ULMA's golden perplexity is below point-wise DPO's (log-ratio)", "ordinary")][2] == "supported"
    assert ("ULMA beats kto", "ordinary") not in rows  # its only run failed: no row to compare
    # gains paired per prompt: ULMA +0.2 against DPO's +0.25; against SFT's +0.1 (main) and -0.1 (held-out)
    assert rows[("ULMA gains more from golden data than dpo", "golden - ordinary")] == (
        "-0.050 [-0.050, -0.050]",
        "-0.050 [-0.050, -0.050]",
        "contradicted",
    )
    assert rows[("ULMA gains more from golden data than sft", "golden - ordinary")][:2] == (
        "+0.100 [+0.100, +0.100]",
        "+0.300 [+0.300, +0.300]",
    )
    claims.main([str(main)])
    out = capsys.readouterr().out
    assert (
        "no held-out set" in out
        and "| ULMA beats dpo | ordinary | +0.100 [+0.100, +0.100] | - | supported on the main set only" in out
    )


def test_a_pretrained_start_is_judged_as_row_start_unless_the_grid_has_a_base_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    start = rng.uniform(0.1, 0.5, size=(1, 80))

    def one_set(folder: Path, rows: dict[tuple[str, str], np.ndarray]) -> Path:
        path = write_set(folder, rows)
        data = json.loads(path.read_text())
        for run in data["runs"]:
            run["init"] = "untrained-seed0-abc"
        data["untrained"] = [{"status": "ok", "key": "untrained-seed0-abc", "metrics": {"score": 0.3}}]
        path.write_text(json.dumps(data))
        evaluated = folder / "stages" / "untrained-seed0-abc" / "eval"
        evaluated.mkdir(parents=True)
        evaluated.joinpath("predictions.jsonl").write_text(
            "".join(json.dumps({"score": float(s)}) + "\n" for s in start[0])
        )
        return path

    pretrained = one_set(tmp_path / "smollm2", {("ulma", "ordinary"): start + 0.05, ("ulma", "golden"): start - 0.1})
    rows = {(c, v): (m, verdict) for c, v, m, _, verdict in claims.claims(claims.Results(pretrained))}
    assert rows[("ULMA beats start", "ordinary")] == (
        "+0.050 [+0.050, +0.050]",
        "supported on the main set only (no held-out set)",
    )
    assert rows[("ULMA beats start", "golden")][0] == "-0.100 [-0.100, -0.100]"  # one start, every variant
    assert not any("than start" in claim for claim, _ in rows)  # trained on neither variant: no gain to compare
    one_seed = one_set(
        tmp_path / "one-seed",
        {("ulma", "ordinary"): start, ("pointwise_dpo", "ordinary"): start},
    )
    data = json.loads(one_seed.read_text())
    for run in data["runs"]:
        run["metrics"]["golden_ppl"] = 5.0 if run["run"] == "ulma" else 9.0
    one_seed.write_text(json.dumps(data))
    ppl = {c: verdict for c, _, _, _, verdict in claims.claims(claims.Results(one_seed))}
    assert ppl["ULMA's golden perplexity is below point-wise DPO's (log-ratio)"].startswith("no interval")
    with_base = one_set(tmp_path / "toy", {("ulma", "ordinary"): start + 0.05, ("base", "ordinary"): start})
    judged = {c for c, *_ in claims.claims(claims.Results(with_base))}
    assert "ULMA beats base" in judged and "ULMA beats start" not in judged


def test_rl_curves_reads_a_runs_last_rl_stage_and_plots(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    spec = importlib.util.spec_from_file_location("rl_curves", REPO / "experiments" / "rl_curves.py")
    rl_curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_curves)
    stage = tmp_path / "stages" / "ppo-seed0-x"
    writer = SummaryWriter(str(stage / "tensorboard"))
    for step in range(5):
        writer.add_scalar("train/reward_step", 1.0 + step, step)
        writer.add_scalar("train/response_length_step", 25.0 - 5 * step, step)
        writer.add_scalar("train/kl_step", 4.0 * step, step)
    writer.close()
    run = tmp_path / "runs" / "rlhf" / "ordinary" / "seed0"
    run.mkdir(parents=True)
    (run / "tensorboard_1_sft").symlink_to(tmp_path)  # not an RL stage: skipped
    (run / "tensorboard_3_ppo").symlink_to(stage)
    assert rl_curves.log_folder(run) == run / "tensorboard_3_ppo"
    series = rl_curves.curves(rl_curves.log_folder(run))
    assert series["train/response_length"] == [(s, 25.0 - 5 * s) for s in range(5)] and "train/kl_coef" not in series
    out = rl_curves.main([str(run), "-o", str(tmp_path / "curves.png")])
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit):
        rl_curves.main([str(tmp_path / "empty")])
