"""Loggers whose folder follows ``trainer.default_root_dir``: one option decides where a run writes."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import loggers

#: hyperparameters LightningCLI adds that are no choice of the run (the instantiator of nested classes)
NOT_HYPERPARAMETERS = ("_instantiator",)


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with ``save_dir`` optional, and a clean HPARAMS view.

    Left unset, the ``ulma`` command sets it to ``trainer.default_root_dir``, so
    ``--trainer.default_root_dir DIR`` puts logs, checkpoints, the saved config and ``hf_model`` under
    ``DIR/<name>/version_N``. Built in Python without it, it writes under the working directory.

    The HPARAMS view names ``hp_metric`` without Lightning's ``-1`` placeholder value at step 0 (the
    :class:`~ulma_lightning.evaluation.GenerationSamples` callback writes its values, those of
    ``val/loss``, at ``val/loss``'s steps), and leaves out LightningCLI's ``_instantiator``.

    Args:
        save_dir: the folder that holds ``<name>/version_N``; default: ``trainer.default_root_dir``.
        name: the experiment's folder name.
        **kwargs: as for ``lightning.pytorch.loggers.TensorBoardLogger``.
    """

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs", **kwargs: Any) -> None:
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, **kwargs)
        self._names_hp_metric = bool(kwargs.get("default_hp_metric", True))
        self._placeholder = False

    def log_hyperparams(self, params: Any, metrics: Any = None, step: int | None = None) -> None:
        if isinstance(params, dict):
            params = {key: value for key, value in params.items() if key not in NOT_HYPERPARAMETERS}
        if metrics is not None or not self._names_hp_metric:
            super().log_hyperparams(params, metrics, step)
            return
        self._placeholder = True  # name hp_metric in the HPARAMS view; log_metrics drops its value
        try:
            super().log_hyperparams(params, {"hp_metric": float("nan")}, step)
        finally:
            self._placeholder = False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._placeholder:
            metrics = {key: value for key, value in metrics.items() if key != "hp_metric"}
            if not metrics:
                return
        super().log_metrics(metrics, step)
