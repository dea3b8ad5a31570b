"""PNG plots of ``ulma compare`` results (matplotlib, no display needed).

* ``bar_<metric>.png``: per headline metric, a bar per method and variant, error bars one standard
  deviation over seeds, cut at the metric's bounds (a score or win rate stays in [0, 1]); golden
  perplexity on a log axis;
* ``score_vs_kl.png``: each run (variant, seed) as a point, ground-truth score against
  KL(policy || its own reference) on a symlog axis: the reward/KL frontier, a distinct colour per
  row, its legend outside the points;
* ``golden_gain.png``: per method, the golden-variant score minus the ordinary-variant score, with
  the standard error of the difference (only when the grid has both variants).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ulma_lightning.compare.report import metric_columns

HEADLINE = ("score", "score_harmless", "score_harmful", "win_vs_untrained", "golden_ppl")
GAIN_VARIANTS = ("ordinary", "golden")
LOG_SCALE = ("golden_ppl",)


def bounds(key: str) -> tuple[float, float]:
    """The range a metric's values can take: scores and win rates [0, 1], perplexity (0, inf)."""
    if key.startswith(("score", "win_vs_")):
        return 0.0, 1.0
    return 0.0, math.inf


def error_bars(means: list[float], stds: list[float], key: str) -> list[list[float]]:
    """Asymmetric error bars (below, above): one standard deviation, cut at the metric's bounds (on a
    log axis the lower bar stops short of 0)."""
    low, high = bounds(key)
    below, above = [], []
    for mean, std in zip(means, stds):
        if math.isnan(mean):
            below.append(0.0)
            above.append(0.0)
            continue
        floor = mean * 0.999 if key in LOG_SCALE else mean - low
        below.append(max(0.0, min(std, floor)))
        above.append(max(0.0, min(std, high - mean)))
    return [below, above]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(tables: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for rows in tables.values():
        names += [n for n in rows if n not in names]
    return names


def _labels(tables: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """The rows' labels (e.g. "SFT then DPO") for run names."""
    found = {name: row["label"] for rows in tables.values() for name, row in rows.items()}
    return [found.get(name, name) for name in names]


def bar_chart(results: dict[str, Any], key: str, title: str, path: Path) -> bool:
    """Grouped bars (methods x variants) of ``key``; False (nothing written) when no run has it."""
    fig = bar_figure(results, key, title)
    if fig is None:
        return False
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return True


def bar_figure(results: dict[str, Any], key: str, title: str) -> Any:
    """The figure of :func:`bar_chart` (None when no run has ``key``)."""
    tables = results["tables"]
    methods, variants = _methods(tables), list(tables)
    if not any(tables[v].get(m, {}).get("metrics", {}).get(key, {}).get("n") for v in variants for m in methods):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(variants)) / 1.5), 4.0))
    width = 0.8 / max(1, len(variants))
    for j, variant in enumerate(variants):
        stats = [
            tables[variant].get(m, {}).get("metrics", {}).get(key, {"mean": math.nan, "std": 0.0, "n": 0})
            for m in methods
        ]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(methods))]
        means = [s["mean"] if s["n"] else math.nan for s in stats]
        ax.bar(
            xs,
            means,
            width,
            yerr=error_bars(means, [s["std"] if s["n"] else 0.0 for s in stats], key),
            capsize=3,
            label=variant,
        )
    if key in LOG_SCALE:
        ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(_labels(tables, methods), rotation=30, ha="right")
    ax.set_ylabel(title + (" (log scale)" if key in LOG_SCALE else ""))
    ax.set_title(f"{title} (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    return fig


def frontier(results: dict[str, Any], path: Path) -> bool:
    """Score against KL, a point per finished run; False when no run has both."""
    fig = frontier_figure(results)
    if fig is None:
        return False
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the legend sits outside the axes
    _pyplot().close(fig)
    return True


def frontier_figure(results: dict[str, Any]) -> Any:
    """The figure of :func:`frontier` (None when no run has both a score and a KL)."""
    points = [
        r
        for r in results["runs"]
        if r["status"] == "ok" and _finite(r["metrics"].get("kl")) and _finite(r["metrics"].get("score"))
    ]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.5))
    markers = {v: m for v, m in zip(results["tables"], "os^Dv<>")}
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: a grid has up to 15 rows
    colors: dict[str, Any] = {}
    for record in points:
        color = colors.setdefault(record["run"], palette[len(colors) % len(palette)])
        label = f"{record['label']} ({record['variant']})"
        seen = label in ax.get_legend_handles_labels()[1]
        ax.scatter(
            record["metrics"]["kl"],
            record["metrics"]["score"],
            color=color,
            marker=markers.get(record["variant"], "o"),
            label=None if seen else label,
        )
    # KL spans 0 (a model near its reference) to 100+ nats (the base against the untrained model):
    # linear below 1 nat, logarithmic above, so the fine-tuned rows do not collapse onto one column
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || own reference), nats (symlog)")
    ax.set_ylabel("ground-truth score of greedy generations")
    ax.set_title("score against KL to each run's reference: a point per run and seed")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def golden_gain(results: dict[str, Any], path: Path) -> bool:
    """Golden minus ordinary mean score per method; False without both variants."""
    tables = results["tables"]
    base, golden = GAIN_VARIANTS
    if base not in tables or golden not in tables:
        return False
    methods = [
        m
        for m in tables[golden]
        if m in tables[base] and tables[golden][m]["metrics"]["score"]["n"] and tables[base][m]["metrics"]["score"]["n"]
    ]
    if not methods:
        return False
    gains, errors = [], []
    for m in methods:
        g, o = tables[golden][m]["metrics"]["score"], tables[base][m]["metrics"]["score"]
        gains.append(g["mean"] - o["mean"])
        errors.append(math.sqrt(g["std"] ** 2 / g["n"] + o["std"] ** 2 / o["n"]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods)), 4.0))
    ax.bar(range(len(methods)), gains, yerr=errors, capsize=3, color="C2")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(_labels(tables, methods), rotation=30, ha="right")
    ax.set_ylabel("score: golden minus ordinary")
    ax.set_title("gain from golden demonstrations (± standard error)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(results: dict[str, Any], root: Path) -> list[Path]:
    """Every plot the results allow, in ``root``; returns the files written."""
    titles = {key: title for key, title, _ in metric_columns(results["evaluation"].get("baseline"))}
    baseline = results["evaluation"].get("baseline")
    keys = list(HEADLINE) + ([f"win_vs_{baseline}"] if baseline else [])
    written = [root / f"bar_{key}.png" for key in keys if bar_chart(results, key, titles[key], root / f"bar_{key}.png")]
    written += [
        p
        for p, made in (
            (root / "score_vs_kl.png", frontier(results, root / "score_vs_kl.png")),
            (root / "golden_gain.png", golden_gain(results, root / "golden_gain.png")),
        )
        if made
    ]
    return written


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)
