"""Loggers whose folder follows ``trainer.default_root_dir``: one option decides where a run writes."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import loggers


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with ``save_dir`` optional.

    Left unset, the ``ulma`` command sets it to ``trainer.default_root_dir``, so
    ``--trainer.default_root_dir DIR`` puts logs, checkpoints, the saved config and ``hf_model`` under
    ``DIR/<name>/version_N``. Built in Python without it, it writes under the working directory.

    Args:
        save_dir: the folder that holds ``<name>/version_N``; default: ``trainer.default_root_dir``.
        name: the experiment's folder name.
        **kwargs: as for ``lightning.pytorch.loggers.TensorBoardLogger``.
    """

    def __init__(self, save_dir: str | None = None, name: str | None = "lightning_logs", **kwargs: Any) -> None:
        super().__init__(save_dir if save_dir is not None else os.getcwd(), name=name, **kwargs)
