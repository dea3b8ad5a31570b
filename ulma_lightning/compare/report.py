"""``results.json`` and ``results.md`` of ``ulma compare``: every run's metrics, and per data variant a
table with a row per method (mean +- std over seeds, the best in bold), the commands and times.

Win rates are computed here, from the per-prompt scores each evaluation saved: ``win_vs_<baseline>``
against the baseline run (``evaluation.baseline``, e.g. SFT) of the same variant and seed, and
``win_vs_untrained`` against the untrained model the run started from; ties count half.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ulma_lightning.compare.metrics import PREDICTIONS_FILE
from ulma_lightning.compare.spec import GridSpec
from ulma_lightning.compare.stages import Plan, digest, read_json, write_json
from ulma_lightning.evaluation.winrate import win_rate

RESULT_FILE = "result.json"
UNTRAINED = "untrained"


def metric_columns(baseline: str | None) -> list[tuple[str, str, str | None]]:
    """``(key, column title, better)`` of the table; ``better`` is ``higher``, ``lower`` or None (not ranked)."""
    columns: list[tuple[str, str, str | None]] = [
        ("score", "score", "higher"),
        ("score_harmless", "helpfulness", "higher"),
        ("score_harmful", "harmlessness", "higher"),
    ]
    if baseline:
        columns.append((f"win_vs_{baseline}", f"win rate vs {baseline}", "higher"))
    columns += [
        ("win_vs_untrained", "win rate vs untrained", "higher"),
        ("golden_ppl", "golden perplexity", "lower"),
        ("kl", "KL to reference", None),
        ("reward_accuracy", "reward model accuracy", None),
        ("train_seconds", "train time (s)", None),
        ("tokens_per_sec", "tokens/s", None),
    ]
    return columns


def start_label(plan: Plan, keys: list[str]) -> str:
    """The label of the row of the runs' starting model: ``untrained`` for a random init, ``start (NAME)``
    for a pretrained model (``policy.model``: SmolLM2 is no untrained model)."""
    models = {
        Path(str(plan.inits[k].policy.get("model"))).name
        for k in keys
        if k in plan.inits and plan.inits[k].policy.get("model")
    }
    return f"start ({', '.join(sorted(models))})" if models else UNTRAINED


def run_folder(root: Path, instance_id: str) -> Path:
    return root / "runs" / instance_id


def evaluation_key(grid: GridSpec) -> str:
    """The digest of the grid's ``evaluation:`` settings that each result records: a result recorded
    under other settings counts as not run (it is evaluated again; its stages are not retrained)."""
    return digest(grid.evaluation.__dict__)


def evaluated(path: Path, key: str) -> dict[str, Any] | None:
    """The result at ``path`` (a ``result.json``) if it records a success under evaluation settings ``key``."""
    result = read_json(path)
    if result is None or result.get("status") != "ok" or result.get("evaluation_key") != key:
        return None
    return result


def init_folder(root: Path, key: str) -> Path:
    return root / "stages" / key / "eval"


def read_scores(folder: Path) -> list[float] | None:
    """The per-prompt scores of a run's (or a start model's) ``predictions.jsonl``; None where it has none."""
    path = folder / PREDICTIONS_FILE
    if not path.is_file():
        return None
    return [json.loads(line)["score"] for line in path.read_text().splitlines() if line.strip()]


def _win(mine: Path, other: Path | None) -> float:
    a, b = read_scores(mine), (read_scores(other) if other is not None else None)
    if a is None or b is None or len(a) != len(b):
        return math.nan
    return win_rate(a, b)


def summarize(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` (sample standard deviation; 0 for one value) and ``n`` of the finite values."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def collect(grid: GridSpec, plan: Plan, root: Path) -> dict[str, Any]:
    """Every run instance's record (finished, failed or pending), the untrained models' records,
    win rates, and per variant and run the mean/std of each metric."""
    baseline = grid.evaluation.baseline
    current = evaluation_key(grid)
    runs = []
    for instance in plan.instances:
        folder = run_folder(root, instance.id)
        record = read_json(folder / RESULT_FILE) or {"status": "pending", "metrics": {}}
        if record["status"] == "ok" and record.get("evaluation_key") != current:  # evaluated with other settings
            record = {"status": "pending", "metrics": {}}
        record.update(
            id=instance.id,
            run=instance.run.name,
            label=instance.run.label,
            variant=instance.variant,
            seed=instance.seed,
            init=instance.init,
            dir=str(folder),
        )
        runs.append(record)
    by_key = {(r["run"], r["variant"], r["seed"]): r for r in runs}
    untrained = {}
    for key in {i.init for i in plan.instances}:
        initial = evaluated(init_folder(root, key) / RESULT_FILE, current)
        if initial is not None:
            untrained[key] = initial
    for record in runs:
        if record["status"] != "ok":
            continue
        folder = Path(record["dir"])
        if baseline:
            other = by_key.get((baseline, record["variant"], record["seed"]))
            record["metrics"][f"win_vs_{baseline}"] = _win(
                folder, Path(other["dir"]) if other and other["status"] == "ok" else None
            )
        record["metrics"]["win_vs_untrained"] = _win(
            folder, init_folder(root, record["init"]) if record["init"] in untrained else None
        )
    tables: dict[str, dict[str, Any]] = {}
    keys = [key for key, _, _ in metric_columns(baseline)]
    for variant in grid.variants:
        rows: dict[str, Any] = {}
        inits = sorted({(r["init"], r["seed"]) for r in runs if r["variant"] == variant and r["init"] in untrained})
        if inits:
            values: dict[str, list[float]] = {k: [] for k in keys}
            for init, seed in inits:
                metrics = dict(untrained[init]["metrics"])
                metrics["win_vs_untrained"] = 0.5
                other = by_key.get((baseline, variant, seed)) if baseline else None
                if baseline:
                    metrics[f"win_vs_{baseline}"] = _win(
                        init_folder(root, init), Path(other["dir"]) if other and other["status"] == "ok" else None
                    )
                for k in keys:
                    values[k].append(metrics.get(k, math.nan))
            rows[UNTRAINED] = {
                "label": start_label(plan, [init for init, _ in inits]),
                "seeds": len(inits),
                "failed": 0,
                "metrics": {k: summarize(v) for k, v in values.items()},
            }
        for run in grid.runs:
            mine = [r for r in runs if r["run"] == run.name and r["variant"] == variant]
            if not mine:
                continue
            done = [r for r in mine if r["status"] == "ok"]
            rows[run.name] = {
                "label": run.label,
                "seeds": len(done),
                "failed": sum(r["status"] == "failed" for r in mine),
                "pending": sum(r["status"] == "pending" for r in mine),
                "metrics": {k: summarize([r["metrics"].get(k, math.nan) for r in done]) for k in keys},
            }
        tables[variant] = rows
    return {
        "grid": str(grid.path),
        "name": grid.name,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": grid.seeds,
        "evaluation": grid.evaluation.__dict__,
        "runs": runs,
        "untrained": list(untrained.values()),
        "tables": tables,
    }


# ----------------------------------------------------------------------------- markdown
DIGITS = {"golden_ppl": 2, "kl": 2, "train_seconds": 1, "tokens_per_sec": 0}  # decimals shown; 3 for the others


def _cell(stats: dict[str, float], bold: bool, digits: int = 3) -> str:
    if not stats["n"]:
        return "-"
    mean, std = stats["mean"], stats["std"]
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if stats["n"] > 1 else "")
    return f"**{text}**" if bold else text


def _best(rows: dict[str, Any], key: str, better: str | None) -> set[str]:
    if better is None:
        return set()
    # only finished rows compete: a row with seeds still to run (or failed) is not a best yet
    means = {
        name: row["metrics"][key]["mean"]
        for name, row in rows.items()
        if row["metrics"][key]["n"] and not row.get("pending") and not row.get("failed")
    }
    if len(set(means.values())) < 2:  # nothing to single out
        return set()
    target = max(means.values()) if better == "higher" else min(means.values())
    return {name for name, value in means.items() if value == target}


def table(rows: dict[str, Any], columns: list[tuple[str, str, str | None]]) -> str:
    """A markdown table: a row per method, mean ± std over seeds, the best of each ranked column in bold."""
    shown = [c for c in columns if any(row["metrics"][c[0]]["n"] for row in rows.values())]
    best = {key: _best(rows, key, better) for key, _, better in shown}
    lines = ["| method | " + " | ".join(title for _, title, _ in shown) + " | seeds |", "|---" * (len(shown) + 2) + "|"]
    for name, row in rows.items():
        cells = [_cell(row["metrics"][key], name in best[key], DIGITS.get(key, 3)) for key, _, _ in shown]
        status = (
            str(row["seeds"])
            + (f" ({row['failed']} failed)" if row.get("failed") else "")
            + (f" ({row['pending']} to run)" if row.get("pending") else "")
        )
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], command: str) -> str:
    """The whole ``results.md``."""
    columns = metric_columns(results["evaluation"].get("baseline"))
    out = [
        f"# {results['name']}: results",
        "",
        f"Made by `{command}` from `{results['grid']}` ({results['written']}); seeds {results['seeds']}.",
        f"Every number is measured on the prompts of `{results['evaluation'].get('prompts')}` (the first "
        f"{results['evaluation'].get('max_prompts') or 'all'}): mean ± sample standard deviation over seeds; the best "
        "of each",
        "ranked column in bold. Score: the ground-truth score of greedy generations; helpfulness (on harmless "
        "requests) and",
        "harmlessness (on harmful requests) split it by request kind. Win rates (ties half) compare per prompt with "
        "the",
        "baseline row and with the untrained model. Golden perplexity: of held-out golden demonstrations. KL to "
        "reference:",
        "KL(policy || the run's own reference: the model its last stage started from), from one sampled response per "
        "prompt (an unbiased estimate, so it can be slightly",
        "negative). Reward model accuracy: the share of the reward stage's validation pairs it ranks right (RLHF "
        "rows). Train time:",
        "all stages of the run (a shared stage counts in every run that uses it).",
        "",
    ]
    for variant, rows in results["tables"].items():
        if rows:
            out += [f"## {variant}", "", table(rows, columns), ""]
    failed = [r for r in results["runs"] if r["status"] == "failed"]
    if failed:
        out += ["## Failed runs", ""]
        for record in failed:
            error = str(record.get("error", "")).strip().replace("\n", "\n    ")
            out += [f"- `{record['id']}` failed:", "", f"    {error}", ""]
    common = _common_options([s["command"] for r in results["runs"] for s in r.get("stages", [])])
    out += ["## Runs", ""]
    if common:
        out += [
            "Every command below also has these options (the grid's, shared by every stage):",
            "",
            "```",
            shlex.join(common),
            "```",
            "",
        ]
    out += ["| run | status | train time (s) | eval time (s) | commands (one per stage) |", "|---|---|---|---|---|"]
    for record in results["runs"]:
        stages = record.get("stages", [])
        commands = (
            "<br>".join(
                f"`{_without(s['command'], common)}`" + (" (shared)" if s.get("shared") else "") for s in stages
            )
            or "-"
        )
        train = record["metrics"].get("train_seconds")
        evaluation = record.get("eval_seconds")
        out.append(
            f"| `{record['id']}` | {record['status']} | {'-' if train is None else f'{train:.1f}'} | "
            f"{'-' if evaluation is None else f'{evaluation:.1f}'} | {commands} |"
        )
    return "\n".join(out) + "\n"


def _option_pairs(command: str) -> list[tuple[str, str]]:
    """``(--key, value)`` pairs of an ``ulma fit ...`` command after its subcommand."""
    words = shlex.split(command)[2:]
    return [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2) if words[i].startswith("--")]


def _common_options(commands: list[str]) -> list[str]:
    """The options (but ``--config``) that every command has with the same value, in order."""
    if len(commands) < 2:
        return []
    shared = set(_option_pairs(commands[0])).intersection(*(set(_option_pairs(c)) for c in commands[1:]))
    return [word for pair in _option_pairs(commands[0]) if pair in shared and pair[0] != "--config" for word in pair]


def _without(command: str, common: list[str]) -> str:
    """``command`` without the ``common`` options, which results.md lists once."""
    drop = set(zip(common[::2], common[1::2]))
    head = shlex.split(command)[:2]
    return shlex.join(head + [word for pair in _option_pairs(command) if pair not in drop for word in pair])


def write_results(results: dict[str, Any], root: Path, command: str) -> None:
    """``results.json`` and ``results.md`` in ``root`` (atomically)."""
    results = {**results, "command": command}
    write_json(root / "results.json", _finite(results))
    tmp = root / ".results.md.tmp"
    tmp.write_text(markdown(results, command))
    tmp.replace(root / "results.md")


def _finite(value: Any) -> Any:
    """NaN as null, so that results.json is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
