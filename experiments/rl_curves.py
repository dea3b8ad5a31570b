"""Why an RL row did (or did not) beat the model it started from: its reward, KL and response-length
curves, read from the TensorBoard logs of ``ulma compare`` stages (or any ``ulma fit`` run).

    python experiments/rl_curves.py runs/compare/paper/runs/rlhf/ordinary/seed0 [more runs ...] -o rl_curves.png

Each argument is a run folder (its ``tensorboard_<i>_<method>`` links are followed, the last RL stage
is used) or a stage/log folder. One panel per curve: ``train/reward`` (the reward model's score of the
rollouts), ``train/kl`` (KL to the reference per response), ``train/response_length`` and
``train/kl_coef`` (the adaptive controller's coefficient); a line per argument. A reward that climbs
while the length collapses and the KL grows is reward over-optimisation (Gao et al., 2022).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CURVES = ("train/reward", "train/kl", "train/response_length", "train/kl_coef")
RL_METHODS = ("ppo", "rloo", "grpo", "online_ulma")


def log_folder(path: Path) -> Path:
    """The folder whose event files to read: a run folder's last RL stage, else ``path`` itself."""
    links = sorted(
        (p for p in path.glob("tensorboard_*_*") if p.name.split("_", 2)[-1] in RL_METHODS),
        key=lambda p: int(p.name.split("_")[1]),
    )
    return links[-1] if links else path


def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> (step, value) of each curve in ``folder``'s event files (the per-step values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags().get("scalars", [])
        for curve in CURVES:
            tag = next((t for t in (f"{curve}_step", curve) if t in tags), None)
            if tag is not None:
                found.setdefault(curve, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {k: sorted(v) for k, v in found.items()}


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> Path:
    """One panel per curve, a line per run; written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.0 * len(CURVES), 3.4))
    for ax, curve in zip(axes, CURVES):
        for name, series in runs.items():
            if series.get(curve):
                steps, values = zip(*series[curve])
                ax.plot(steps, values, label=name)
        ax.set_title(curve)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of ulma compare, or stage/log folders")
    parser.add_argument("-o", "--output", type=Path, default=Path("rl_curves.png"))
    args = parser.parse_args(argv)
    runs = {str(path): curves(log_folder(path)) for path in args.runs}
    empty = [name for name, series in runs.items() if not series]
    if empty:
        parser.error(f"no RL curves ({', '.join(CURVES)}) in the event files under {', '.join(empty)}")
    out = plot(runs, args.output)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
