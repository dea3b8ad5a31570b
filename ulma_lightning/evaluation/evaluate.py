"""``ulma evaluate``: every number for one checkpoint, as a table and a JSON file.

    ulma evaluate --ckpt_path runs/ulma/version_0/checkpoints/last.ckpt

finds the run's saved ``config.yaml`` (beside ``checkpoints/``) and reuses it when no ``--config`` is
given; ``--ckpt_path`` may also name the run folder (its ``checkpoints/last.ckpt`` is evaluated). It
runs ``test`` on ``data.test`` (loss, ``test/perplexity`` of the demonstrations, the implicit-reward
accuracy and AUC, and for continuous labels the Pearson and Spearman correlations), then ``predict``
on ``data.predict`` (default ``data.test``): generations scored by the ``evaluation.scorers``, mean
scores and win rates against the reference responses and against ``evaluation.compare_to``. It
prints a table and writes ``--output`` (default ``evaluation.json`` beside the predictions). Without
``--ckpt_path`` the model is evaluated as initialised (the "before training" numbers). Every other
argument is ``ulma fit``'s (``--config``, ``--model.*``, ``--data.*``, ``--trainer.*``,
``--evaluation.*``); a run's saved ``config.yaml`` works as ``--config``. A checkpoint of a run
(``R/checkpoints/X.ckpt``) is evaluated into its run folder ``R`` (``predictions.jsonl``,
``evaluation.json``; no new ``version_N``, no TensorBoard log). A failed evaluation removes the log
folder (``version_N``) it created.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule

from ulma_lightning.data.datamodule import AlignmentDataModule
from ulma_lightning.evaluation.writer import PredictionWriter
from ulma_lightning.lightning_cli import CLI_DEFAULTS, DEFAULTS_FILE, ULMACLI


class EvaluateCLI(ULMACLI):
    """The ``ulma`` parser without subcommands, plus ``--ckpt_path``, ``--output`` and ``--skip_*``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="the checkpoint to evaluate (default: the initial weights)",
        )
        parser.add_argument(
            "--output",
            type=str | None,
            default=None,
            help="the JSON report (default: evaluation.json beside the predictions)",
        )
        parser.add_argument(
            "--skip_test", type=bool, default=False, help="skip the test-set metrics (perplexity, reward accuracy/AUC)"
        )
        parser.add_argument("--skip_predict", type=bool, default=False, help="skip generation, scores and win rates")
        # accepted (and unused) so that the config.yaml a run of any subcommand saved works as --config
        parser.add_argument("--verbose", type=bool, default=True, help=argparse.SUPPRESS)
        parser.add_argument("--return_predictions", type=bool | None, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--weights_only", type=bool | None, default=None, help=argparse.SUPPRESS)


def run_folder_checkpoint(ckpt_path: str, command: str = "ulma evaluate") -> str:
    """``ckpt_path`` itself, or for a run folder (one with ``checkpoints/``) its ``checkpoints/last.ckpt``."""
    folder = Path(ckpt_path)
    if not (folder / "checkpoints").is_dir():
        return ckpt_path  # a file, or a sharded checkpoint folder
    last = folder / "checkpoints" / "last.ckpt"
    if not last.exists():
        found = sorted(p.name for p in (folder / "checkpoints").iterdir())
        raise FileNotFoundError(
            f"{command}: {folder} is a run folder without checkpoints/last.ckpt (it has {found}); pass --ckpt_path FILE"
        )
    return str(last)


def saved_config(ckpt_path: str) -> Path | None:
    """The ``config.yaml`` the run of ``ckpt_path`` saved: in the checkpoint's folder or up to two above."""
    for folder in list(Path(ckpt_path).resolve().parents)[:3]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def run_folder_of(ckpt_path: str) -> Path | None:
    """The run folder a checkpoint was saved in (``R`` for ``R/checkpoints/last.ckpt``), or None."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


#: what ``ulma evaluate`` and ``ulma predict`` set to write into the evaluated run's folder: no logger
#: (no new ``version_N`` beside the run, nothing written over its TensorBoard logs or ``hparams.yaml``)
#: and no checkpoint callback (nothing to save; no "dirpath has changed" warning on loading its state)
IN_RUN_FOLDER = ("--trainer.logger", "--trainer.enable_checkpointing", "--trainer.default_root_dir")


def with_run_checkpoint(argv: list[str], command: str = "ulma evaluate") -> tuple[list[str], Path | None]:
    """``argv`` with ``--ckpt_path`` resolved (a run folder: its last checkpoint), and the run folder
    the outputs go to.

    A checkpoint that does not exist is an error naming it. Without ``--config``, the run's saved
    ``config.yaml`` becomes the first ``--config``. A checkpoint in a run folder (``R/checkpoints/``)
    writes its outputs into ``R`` (``--trainer.default_root_dir R``, no logger, no checkpointing),
    unless the command line sets those options itself.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", action="append")
    pre.add_argument("--ckpt_path")
    known, _ = pre.parse_known_args(argv)
    if known.ckpt_path is None:
        return argv, None
    ckpt = run_folder_checkpoint(known.ckpt_path, command)
    if not Path(ckpt).exists():
        raise FileNotFoundError(
            f"{command}: no such checkpoint: {ckpt} (pass --ckpt_path an existing .ckpt file, sharded checkpoint "
            "folder or run folder)"
        )
    rest = [
        a for i, a in enumerate(argv) if not (a.startswith("--ckpt_path") or (i > 0 and argv[i - 1] == "--ckpt_path"))
    ]
    argv = [*rest, f"--ckpt_path={ckpt}"]
    run = run_folder_of(ckpt)
    if run is not None and not any(a.split("=")[0] in IN_RUN_FOLDER for a in argv):
        argv += ["--trainer.logger=false", "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={run}"]
    else:
        run = None
    if known.config:
        return argv, run
    config = saved_config(ckpt)
    if config is None:
        raise FileNotFoundError(
            f"{command}: no config.yaml found beside {ckpt} (looked in its folder and two above); pass the run's "
            "config with --config"
        )
    print(f"{command}: using the run's saved config {config}")
    return ["--config", str(config), *argv], run


@contextmanager
def expected_warnings() -> Iterator[None]:
    """Silence what ``ulma evaluate`` and ``ulma predict`` do on purpose: pass their resolved arguments
    to LightningCLI, and load a checkpoint without the checkpoint callbacks that saved it (nothing is
    checkpointed in test or predict; the callbacks' state stays in the checkpoint)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        warnings.filterwarnings(
            "ignore", message="Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"
        )
        yield


def with_saved_config(argv: list[str]) -> list[str]:
    """:func:`with_run_checkpoint`'s arguments for ``ulma evaluate``."""
    return with_run_checkpoint(argv)[0]


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


#: CLI_DEFAULTS for a CLI without subcommands: the shared defaults file is read by its one parser.
SINGLE_PARSER_DEFAULTS = {**CLI_DEFAULTS, "parser_kwargs": {"default_config_files": [str(DEFAULTS_FILE)]}}


def format_report(report: dict[str, Any]) -> str:
    """Two columns: metric and value (test metrics, then per-scorer generation numbers and the
    count of empty responses)."""
    rows = [(name, value) for name, value in report.get("test", {}).items()]
    for scorer, stats in report.get("generation", {}).items():
        rows += [(f"generation/{scorer}/{key}", value) for key, value in stats.items()]
    if "num_predictions" in report:
        rows.append(("generation/empty_responses", f"{report['empty_responses']} of {report['num_predictions']}"))
    if not rows:
        return "(nothing evaluated)"
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in rows:
        shown = (
            value
            if isinstance(value, str)
            else "nan"
            if math.isnan(value)
            else f"{value:.4f}"
            if value == 0 or abs(value) >= 1e-3
            else f"{value:.3e}"
        )  # a small value is no 0.0000
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def evaluate_main(argv: list[str]) -> dict[str, Any]:
    """Run ``ulma evaluate`` with command-line arguments ``argv``; return the report."""
    with expected_warnings():
        cli = EvaluateCLI(
            LightningModule,
            AlignmentDataModule,
            args=with_saved_config(argv),
            run=False,
            save_config_callback=None,
            **SINGLE_PARSER_DEFAULTS,
        )
    log_dir = Path(cli.trainer.log_dir) if cli.trainer.log_dir else None
    existed = log_dir is not None and log_dir.exists()
    try:
        with expected_warnings():
            return _evaluate(cli)
    except BaseException:
        if log_dir is not None and not existed and log_dir.exists() and cli.trainer.is_global_zero:
            shutil.rmtree(log_dir, ignore_errors=True)  # no stray version_N from a failed evaluation
        raise


def _evaluate(cli: EvaluateCLI) -> dict[str, Any]:
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    ckpt_path = cli.config.get("ckpt_path")
    report: dict[str, Any] = {"ckpt_path": ckpt_path, "test": {}, "generation": {}}
    if not cli.config.get("skip_test"):
        if not datamodule.has_split("test"):
            raise ValueError(
                "ulma evaluate: no test data: set data.test (or data.val / data.val_fraction, which it defaults to), "
                "or pass --skip_test true"
            )
        results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        report["test"] = {name: _number(value) for name, value in sorted(results[0].items())} if results else {}
    writer = next((c for c in trainer.callbacks if isinstance(c, PredictionWriter)), None)
    if not cli.config.get("skip_predict") and writer is not None:
        if not datamodule.has_split("predict"):
            raise ValueError(
                "ulma evaluate: neither data.predict nor data.test is set; set one (or pass --skip_predict true)"
            )
        trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, return_predictions=False)
        report["generation"] = writer.summary
        report["predictions"] = str(writer.path)
        report["num_predictions"] = len(writer.rows)
        report["empty_responses"] = writer.empty
    output = cli.config.get("output")
    if output is None:
        base = (
            writer.path.parent
            if writer is not None and writer.path is not None
            else Path(trainer.log_dir or trainer.default_root_dir)
        )
        output = str(base / "evaluation.json")
    report["output"] = output
    if trainer.is_global_zero:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(report, indent=2))
        print(format_report(report))
        print(f"report written to {output}")
    return report
