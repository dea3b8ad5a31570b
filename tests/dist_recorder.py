"""Test-only callback for the subprocess runs of test_distributed.py (imported by class path).

``Recorder`` writes, per process: the sample ids of every training batch (one JSON line each, in
order), and at the end of fit the policy's full weights and its logits on a fixed input. With the
environment variable ``ULMA_TEST_KILL_AT_STEP=k`` it SIGKILLs its own process when batch ``k + 1``
starts, i.e. right after the checkpoint of optimizer step ``k`` was written.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

FIXED_INPUT = torch.arange(3, 19).unsqueeze(0)


class Recorder(pl.Callback):
    """Records seen sample ids, final weights and logits under ``out``.

    Args:
        out: folder for ``ids.rank{r}.jsonl``, ``weights.rank{r}.pt`` and ``logits.pt``.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.kill_at = int(os.environ.get("ULMA_TEST_KILL_AT_STEP", "-1"))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"ids.rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(batch["index"].tolist()) + "\n")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ulma_lightning.logprobs import is_fsdp2

        model = pl_module.policy.model
        if is_fsdp2(model):  # every process gathers the whole model
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            state = model.state_dict()
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"weights.rank{trainer.global_rank}.pt")
        with torch.no_grad():
            logits = model(input_ids=FIXED_INPUT.to(pl_module.device)).logits.float().cpu()
        if trainer.is_global_zero:
            torch.save(logits, self.out / "logits.pt")
        reference = pl_module.policy.reference_model
        stats = {
            "reference_forward_samples": pl_module.policy.reference_forward_samples,
            "reference": None if reference is None else ("fsdp2" if is_fsdp2(reference) else "whole"),
            "policy": "fsdp2" if is_fsdp2(model) else "whole",
        }
        (self.out / f"stats.rank{trainer.global_rank}.json").write_text(json.dumps(stats))
