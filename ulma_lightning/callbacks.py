"""Callbacks: training throughput, and the Hugging Face export at the end of a fit."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

import ulma_lightning._compat as _compat
from ulma_lightning.export import export_atomically, export_hf, gather_policy_state

log = logging.getLogger(__name__)


class TokenThroughput(pl.Callback):
    """Logs ``train/tokens_per_sec``: non-padding tokens over the wall time of the training steps
    (forward, backward, optimizer) since the last logged step, so one slow step does not stand for
    the ``log_every_n_steps`` steps around it. Validation and checkpointing are not counted.

    The count is for this process; multiply by the number of processes for the global rate.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._tokens = 0
        self._seconds = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        self._seconds += time.perf_counter() - self._start
        self._tokens += sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
        pl_module.log(
            "train/tokens_per_sec", self._tokens / max(self._seconds, 1e-9), on_step=True, on_epoch=True, batch_size=1
        )
        if _compat.logs_this_step(trainer):  # this step's value is written: start a new window
            self._tokens, self._seconds = 0, 0.0


class HFExport(pl.Callback):
    """At the end of ``fit``, writes the policy as a Hugging Face folder (``save_pretrained``).

    Calls the module's ``export_hf(path, merge_lora=...)`` when it has one (every
    :class:`~ulma_lightning.AlignmentModule` and :class:`~ulma_lightning.RolloutModule` does; the reward
    model writes its scoring model).
    Under FSDP and FSDP2 every process takes part in gathering the full weights, which reach
    ``export_hf`` as ``state_dict=``; rank 0 writes. The folder is written under a hidden
    ``.NAME.partial`` beside it and moved into place whole, so a failed export (a full disk) leaves
    no folder that looks complete (:func:`~ulma_lightning.export.export_atomically`).

    Args:
        dirname: folder name, inside the run's log directory unless absolute.
        merge_lora: merge LoRA adapters into the weights (True) or save the adapter alone.
    """

    def __init__(self, dirname: str = "hf_model", merge_lora: bool = True) -> None:
        self.dirname = dirname
        self.merge_lora = merge_lora
        self.path: Path | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = Path(self.dirname) if Path(self.dirname).is_absolute() else root / self.dirname
        path = Path(trainer.strategy.broadcast(str(path)))
        sharded, state = gather_policy_state(trainer, pl_module)
        if trainer.is_global_zero:
            full = {"state_dict": state} if sharded else {}

            def write(partial: Path) -> None:
                if hasattr(pl_module, "export_hf"):
                    pl_module.export_hf(partial, merge_lora=self.merge_lora, **full)
                else:
                    export_hf(
                        pl_module.policy.model, pl_module.policy.tokenizer, partial, merge_lora=self.merge_lora, **full
                    )

            export_atomically(write, path, what="HFExport (trainer.callbacks)")
            log.info("saved the trained policy as a Hugging Face folder: %s", path)
        trainer.strategy.barrier("hf_export")
        self.path = path
