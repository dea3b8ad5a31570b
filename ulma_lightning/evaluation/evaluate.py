"""``ulma evaluate``: every number for one checkpoint, as a table and a JSON file.

    ulma evaluate --config configs/ulma.yaml --ckpt_path runs/ulma/version_0/checkpoints/last.ckpt

runs ``test`` on ``data.test`` (loss, ``test/perplexity`` of the demonstrations, the implicit-reward
accuracy and AUC, and for continuous labels the Pearson and Spearman correlations), then ``predict``
on ``data.predict`` (default ``data.test``): generations scored by the ``evaluation.scorers``, mean
scores and win rates against the reference responses and against ``evaluation.compare_to``. It
prints a table and writes ``--output`` (default ``evaluation.json`` beside the predictions). Without
``--ckpt_path`` the model is evaluated as initialised (the "before training" numbers). Every other
argument is ``ulma fit``'s (``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``,
``--evaluation.*``); a run's saved ``config.yaml`` works as ``--config``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional

from ulma_lightning.cli import CLI_DEFAULTS, ULMACLI
from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.evaluation.writer import PredictionWriter
from ulma_lightning.modules.base import AlignmentModule


class EvaluateCLI(ULMACLI):
    """The ``ulma`` parser without subcommands, plus ``--ckpt_path``, ``--output`` and ``--skip_*``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="the checkpoint to evaluate (default: the initial weights)")
        parser.add_argument("--output", type=Optional[str], default=None, help="the JSON report (default: evaluation.json beside the predictions)")
        parser.add_argument("--skip_test", type=bool, default=False, help="skip the test-set metrics (perplexity, reward accuracy/AUC)")
        parser.add_argument("--skip_predict", type=bool, default=False, help="skip generation, scores and win rates")
        # accepted (and unused) so that the config.yaml a run of any subcommand saved works as --config
        parser.add_argument("--verbose", type=bool, default=True, help=argparse.SUPPRESS)
        parser.add_argument("--return_predictions", type=Optional[bool], default=None, help=argparse.SUPPRESS)


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def format_report(report: dict[str, Any]) -> str:
    """Two columns: metric and value (test metrics, then per-scorer generation numbers)."""
    rows = [(name, value) for name, value in report.get("test", {}).items()]
    for scorer, stats in report.get("generation", {}).items():
        rows += [(f"generation/{scorer}/{key}", value) for key, value in stats.items()]
    if not rows:
        return "(nothing evaluated)"
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in rows:
        shown = "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def evaluate_main(argv: list[str]) -> dict[str, Any]:
    """Run ``ulma evaluate`` with command-line arguments ``argv``; return the report."""
    with warnings.catch_warnings():  # `ulma evaluate ...` passes its own argv on, by design
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = EvaluateCLI(AlignmentModule, AlignmentDataModule, args=argv, run=False, save_config_callback=None, **CLI_DEFAULTS)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    ckpt_path = cli.config.get("ckpt_path")
    report: dict[str, Any] = {"ckpt_path": ckpt_path, "test": {}, "generation": {}}
    if not cli.config.get("skip_test"):
        if datamodule.sources.get("test") is None:
            raise ValueError("ulma evaluate: data.test is not set; set it (or pass --skip_test true)")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        report["test"] = {name: _number(value) for name, value in sorted(results[0].items())} if results else {}
    writer = next((c for c in trainer.callbacks if isinstance(c, PredictionWriter)), None)
    if not cli.config.get("skip_predict") and writer is not None:
        if datamodule.sources.get("predict") is None:
            raise ValueError("ulma evaluate: neither data.predict nor data.test is set; set one (or pass --skip_predict true)")
        trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
        report["generation"] = writer.summary
        report["predictions"] = str(writer.path)
        report["num_predictions"] = len(writer.rows)
    output = cli.config.get("output")
    if output is None:
        base = writer.path.parent if writer is not None and writer.path is not None else Path(trainer.log_dir or trainer.default_root_dir)
        output = str(base / "evaluation.json")
    report["output"] = output
    if trainer.is_global_zero:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
        print(format_report(report))
        print(f"report written to {output}")
    return report
