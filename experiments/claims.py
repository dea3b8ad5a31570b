"""The paper's claims, judged on finished ``ulma compare`` runs of ``experiments/paper.yaml``: the main
set and the held-out set (``--heldout``), by protocol v2's rule (docs/replication.md).

    python experiments/claims.py [MAIN/results.json [HELDOUT/results.json]]

defaults: ``runs/compare/paper/results.json`` and ``runs/compare/paper-heldout/results.json``; any grid's
results work (``experiments/paper-smollm2.yaml``'s, where the pretrained start model is row ``start``).
Prints a markdown table: each claim, per data variant, the paired effect with its 95% bootstrap
interval on each set (:mod:`ulma_lightning.compare.stats`), and the verdict. Scores are paired per
prompt and seed from each run's ``predictions.jsonl``; golden perplexity has one value per run, so
its effect (the log-ratio of the two perplexities) is paired per seed only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ulma_lightning.compare.report import init_folder, read_scores
from ulma_lightning.compare.stats import NO_EFFECT, Effect, Kind, paired_effect, verdict

#: the rows ULMA is claimed to beat; "point-wise DPO is at least as good as DPO" uses MARGIN. ``start`` is the
#: model every chain starts from, a row only where the grid has no ``base`` row (a pretrained start: SmolLM2)
BASELINES = ["base", "start", "sft", "sft_dpo", "dpo", "pointwise_dpo", "unlikelihood", "kto", "rlhf", "rloo", "grpo"]
#: the online comparison (issue 25): online ULMA against the RL rows with the same reward model
ONLINE = ("online_ulma", ["rlhf", "rloo", "grpo"])
CONTINUOUS = ["pointwise_dpo_continuous", "ulma_continuous"]
MARGIN = 0.02  # stated before the v2 run: 2 points of score on [0, 1]

Matrix = dict[int, list[float]]  # seed -> per-prompt values


class Results:
    """One results.json with its runs' per-prompt scores (read from their predictions)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text())
        self.scores: dict[tuple[str, str], Matrix] = {}
        self.ppl: dict[tuple[str, str], Matrix] = {}
        for run in self.data["runs"]:
            if run["status"] != "ok":
                continue
            key = (run["run"], run["variant"])
            scores = read_scores(self._folder(run))
            if scores is not None:
                self.scores.setdefault(key, {})[run["seed"]] = scores
            value = run.get("metrics", {}).get("golden_ppl")
            if value is not None and not math.isnan(value):
                self.ppl.setdefault(key, {})[run["seed"]] = [math.log(value)]
        if not any(run == "base" for run, _ in self.scores):
            self._add_start()

    def _add_start(self) -> None:
        """The start model's greedy scores (``stages/<init>/eval``) as row ``start``, per variant and seed."""
        starts = {
            record["key"]: read_scores(init_folder(self.path.parent, record["key"]))
            for record in self.data.get("untrained", [])
            if record.get("status") == "ok"
        }  # each start model's predictions, read once for all the runs that start from it
        for run in self.data["runs"]:
            scores = starts.get(run.get("init")) if run["status"] == "ok" else None
            if scores is not None:
                self.scores.setdefault(("start", run["variant"]), {})[run["seed"]] = scores

    def _folder(self, run: dict[str, Any]) -> Path:
        folder = Path(run.get("dir", ""))
        return folder if folder.is_dir() else self.path.parent / "runs" / run["id"]

    def variants(self) -> list[str]:
        return sorted({v for _, v in self.scores}, key=lambda v: (v != "ordinary", v))


def effect(a: Matrix | None, b: Matrix | None) -> Effect:
    """The paired effect of ``a - b`` over their common seeds (NO_EFFECT where a side is missing)."""
    if not a or not b:
        return NO_EFFECT
    seeds = sorted(set(a) & set(b))
    if not seeds or any(len(a[s]) != len(b[s]) for s in seeds) or len({len(a[s]) for s in seeds}) != 1:
        return NO_EFFECT
    return paired_effect(np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds]))


def gain(table: dict[tuple[str, str], Matrix], run: str) -> Matrix | None:
    """Per seed and prompt, the run's golden score minus its ordinary score (the same test prompts)."""
    golden, ordinary = table.get((run, "golden")), table.get((run, "ordinary"))
    if not golden or not ordinary:
        return None
    return {
        s: [g - o for g, o in zip(golden[s], ordinary[s])]
        for s in set(golden) & set(ordinary)
        if len(golden[s]) == len(ordinary[s])
    }


Row = tuple[str, str, str, str, str]  # claim, variant, main effect, held-out effect, verdict


def claims(main: Results, heldout: Results | None = None) -> list[Row]:
    """The claims table: every claim per variant, its effect on both sets and its verdict."""
    rows: list[Row] = []

    def judge(claim: str, variant: str, get: Any, kind: Kind = "beats", margin: float = 0.0) -> None:
        mine = get(main)
        theirs = get(heldout) if heldout is not None else None
        judged = verdict(mine, theirs, kind, margin)
        if any(e is not None and e.seeds * e.prompts == 1 for e in (mine, theirs)):
            judged = "no interval (one value a set: one seed)"  # golden perplexity with one seed a set
        rows.append((claim, variant, str(mine), str(theirs) if theirs is not None else "-", judged))

    for variant in main.variants():

        def score(a: str, b: str, variant: str = variant) -> Any:
            return lambda r: effect(r.scores.get((a, variant)), r.scores.get((b, variant)))

        for baseline in BASELINES:
            if (baseline, variant) in main.scores:
                judge(f"ULMA beats {baseline}", variant, score("ulma", baseline))
        judge(
            f"point-wise DPO is at least as good as DPO (margin {MARGIN})",
            variant,
            score("pointwise_dpo", "dpo"),
            "at_least",
            MARGIN,
        )
        online, rivals = ONLINE
        for rival in rivals:
            if (online, variant) in main.scores and (rival, variant) in main.scores:
                judge(f"online ULMA beats {rival}", variant, score(online, rival))
        for continuous in CONTINUOUS:
            if (continuous, variant) in main.scores:
                judge(f"{continuous} beats DPO (pairwise)", variant, score(continuous, "dpo"))
        judge(
            "ULMA's golden perplexity is below point-wise DPO's (log-ratio)",
            variant,
            lambda r, variant=variant: effect(r.ppl.get(("pointwise_dpo", variant)), r.ppl.get(("ulma", variant))),
        )
    runs = sorted(
        {
            run
            for run, v in main.scores
            if v == "golden" and (run, "ordinary") in main.scores and run not in ("ulma", "start")
        }  # the start model is not trained on either variant: it has no gain
    )
    for other in runs:
        judge(
            f"ULMA gains more from golden data than {other}",
            "golden - ordinary",
            lambda r, other=other: effect(gain(r.scores, "ulma"), gain(r.scores, other)),
        )
    return rows


def main(argv: list[str]) -> None:
    main_path = Path(argv[0] if argv else "runs/compare/paper/results.json")
    heldout_path = (
        Path(argv[1])
        if len(argv) > 1
        else main_path.parent.with_name(main_path.parent.name + "-heldout") / "results.json"
    )
    first = Results(main_path)
    second = Results(heldout_path) if heldout_path.is_file() else None
    print(f"Claims judged on {main_path} ({first.data.get('command', '')})")
    print(
        f"and the held-out set {heldout_path} ({second.data.get('command', '')})\n"
        if second
        else f"and no held-out set ({heldout_path} not found)\n"
    )
    print(
        "| claim | variant | main set: effect [95% CI] | held-out set: effect [95% CI] | verdict |\n"
        "| --- | --- | --- | --- | --- |"
    )
    for row in claims(first, second):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
