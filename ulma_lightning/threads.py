"""One CPU thread for a tiny model: ``ulma``'s demo runs faster on one intra-op thread than on several.

A model of a few hundred thousand parameters does tiny matrix products; splitting each over OpenMP
threads costs more than it saves, and where other processes share the cores a thread waiting for a
descheduled peer stalls every op (measured: 60 steps of ``configs/ulma.yaml`` took 25 s on one
thread and 259 s on two, on 2 cores under load; README, "Quickstart").
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

#: a module with fewer parameters (policy and reference together) runs on one CPU thread
SMALL_MODEL_PARAMETERS = 2_000_000
#: set by the user, these decide the thread count and this callback does nothing
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class SmallModelThreads(pl.Callback):
    """Runs a module of under :data:`SMALL_MODEL_PARAMETERS` parameters on one CPU thread, with a log
    line, unless ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) is set or the model is not on the CPU.
    The ``ulma`` command adds it to every run."""

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(name in os.environ for name in THREAD_VARIABLES) or torch.get_num_threads() == 1:
            return
        if trainer.strategy.root_device.type != "cpu":
            return
        parameters = sum(p.numel() for p in pl_module.parameters())
        if parameters >= SMALL_MODEL_PARAMETERS:
            return
        torch.set_num_threads(1)
        log.info(
            "%.2fM parameters on CPU: 1 thread (faster than several for a model this small; set OMP_NUM_THREADS to "
            "choose)",
            parameters / 1e6,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)


def add_small_model_threads(trainer: Any) -> None:
    """Append :class:`SmallModelThreads` to ``trainer``'s callbacks (once)."""
    if not any(isinstance(callback, SmallModelThreads) for callback in trainer.callbacks):
        trainer.callbacks.append(SmallModelThreads())
