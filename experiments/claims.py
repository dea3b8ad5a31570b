"""The paper's claims, judged on a finished ``ulma compare`` of ``experiments/paper.yaml``.

    python experiments/claims.py [runs/compare/paper/results.json]

Prints a markdown table: each claim, per data variant, the numbers it rests on and the verdict by the
rule fixed before the run (docs/replication.md, "Protocol of our run"): "A beats B" is *supported* when
A is better on every seed (seed s against seed s), *mixed* when on all but one, *not supported*
otherwise; "A is at least as good as B" is *supported* when A's mean is not below B's by more than B's
standard deviation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ulma_lightning.compare.report import summarize

BASELINES = ["sft", "sft_dpo", "dpo", "pointwise_dpo", "unlikelihood", "kto", "rlhf"]


def per_seed(results: dict[str, Any], metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """(run, variant) -> seed -> the metric, over the finished runs."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for run in results["runs"]:
        value = run.get("metrics", {}).get(metric)
        if run["status"] == "ok" and value is not None:
            out.setdefault((run["run"], run["variant"]), {})[run["seed"]] = float(value)
    return out


def beats(a: dict[int, float], b: dict[int, float], lower_is_better: bool = False) -> tuple[str, str]:
    """The seed-paired verdict of "a beats b" and the wins it counts."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "not run", "-"
    wins = sum((a[s] < b[s]) if lower_is_better else (a[s] > b[s]) for s in seeds)
    verdict = "supported" if wins == len(seeds) else "mixed" if wins == len(seeds) - 1 and len(seeds) > 2 else "not supported"
    return verdict, f"{wins}/{len(seeds)} seeds"


def mean_std(values: dict[int, float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds, as results.md computes them."""
    stats = summarize(list(values.values()))
    return stats["mean"], stats["std"]


def fmt(values: dict[int, float] | None) -> str:
    if not values:
        return "not run"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def claims(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(claim, variant, numbers, verdict) rows."""
    score = per_seed(results, "score")
    ppl = per_seed(results, "golden_ppl")
    variants = sorted({v for _, v in score}, key=lambda v: (v != "ordinary", v))
    rows: list[tuple[str, str, str, str]] = []
    for variant in variants:
        get = lambda run, variant=variant: score.get((run, variant), {})  # noqa: E731
        p, d = get("pointwise_dpo"), get("dpo")
        if p and d:
            (pm, _), (dm, ds) = mean_std(p), mean_std(d)
            verdict = "supported" if pm >= dm - ds else "not supported"
            rows.append(("point-wise DPO is at least as good as DPO", variant, f"{fmt(p)} vs {fmt(d)}", verdict))
        for baseline in BASELINES:
            verdict, wins = beats(get("ulma"), get(baseline))
            rows.append((f"ULMA beats {baseline}", variant, f"{fmt(get('ulma'))} vs {fmt(get(baseline))} ({wins})", verdict))
        for continuous in ("pointwise_dpo_continuous", "ulma_continuous"):
            verdict, wins = beats(get(continuous), d)
            rows.append((f"{continuous} beats DPO (pairwise)", variant, f"{fmt(get(continuous))} vs {fmt(d)} ({wins})", verdict))
        up, pp = ppl.get(("ulma", variant), {}), ppl.get(("pointwise_dpo", variant), {})
        verdict, wins = beats(up, pp, lower_is_better=True)
        rows.append(("ULMA's golden perplexity is below point-wise DPO's", variant, f"{fmt(up)} vs {fmt(pp)} ({wins})", verdict))
    gains = {}
    for run in {r for r, _ in score}:
        if score.get((run, "ordinary")) and score.get((run, "golden")):
            gains[run] = mean_std(score[(run, "golden")])[0] - mean_std(score[(run, "ordinary")])[0]
    if gains:
        order = sorted(gains, key=gains.get, reverse=True)
        shown = ", ".join(f"{run} {gains[run]:+.3f}" for run in order)
        verdict = "supported" if order[0] == "ulma" else "not supported"
        rows.append(("ULMA gains most from golden data", "golden - ordinary", shown, verdict))
    return rows


def main(argv: list[str]) -> None:
    path = Path(argv[0] if argv else "runs/compare/paper/results.json")
    results = json.loads(path.read_text())
    print(f"Claims judged on {path} ({results.get('command', '')})\n")
    print("| claim | variant | numbers (mean ± std over seeds) | verdict |\n| --- | --- | --- | --- |")
    for row in claims(results):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
