"""Continuing a finished run equals one uninterrupted run of the larger step count (issue 15, item 1).

A fit stopped by ``max_steps`` (or ``max_time``) mid-epoch used to save a ``last.ckpt`` that counted
the cut epoch as completed, so ``--ckpt_path last`` skipped the rest of it; and a fit stopped after a
mid-epoch validation kept that validation's step as ``last``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ulma_lightning.cli import main

pytestmark = pytest.mark.integration  # every test here builds a Trainer

REPO = Path(__file__).resolve().parents[1]
TOTAL = 6  # steps of the uninterrupted run; an epoch of demo://binary?n=48 is 8 batches of 6


def fit(root: Path, *extra: str):
    """``ulma fit --config configs/ulma.yaml`` on a small demo set, writing under ``root``."""
    return main([
        "fit", "--config", str(REPO / "configs" / "ulma.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
        "--data.init_args.train", "demo://binary?n=48", "--data.init_args.batch_size", "6",
        *extra,
    ])  # fmt: skip


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return fit(tmp_path_factory.mktemp("whole"), "--trainer.max_steps", str(TOTAL)).model.state_dict()


def test_continuing_a_run_stopped_by_max_steps_equals_one_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    first = 5  # after the mid-epoch validation at step 4, before the epoch's end (8)
    fit(tmp_path, "--trainer.max_steps", str(first))
    last = tmp_path / "ulma" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == first  # last is the final step
    assert checkpoint["epoch"] == 0  # the epoch is unfinished
    continued = fit(tmp_path, "--trainer.max_steps", str(TOTAL), "--ckpt_path", "last")
    assert continued.trainer.global_step == TOTAL
    state = continued.model.state_dict()
    assert state.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(state[name], value), name


def test_a_continuation_whose_schedule_spans_other_steps_says_so(tmp_path: Path) -> None:
    """Stopped by max_steps after warm-up, the first run decayed its learning rate over its own
    length: continuing it cannot equal one longer run, and the resumed run says so."""
    warmup = ["--model.init_args.optimizer.warmup_steps", "1", "--trainer.limit_val_batches", "0"]
    fit(tmp_path, "--trainer.max_steps", "2", *warmup)
    with pytest.warns(UserWarning, match=r"schedule spanned 2 steps, this run's spans 3.*optimizer.schedule_steps"):
        fit(tmp_path, "--trainer.max_steps", "3", *warmup, "--ckpt_path", "last")
