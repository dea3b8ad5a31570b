"""What a run tells its user: progress of long phases, a warning for CPU mixed precision, one metric
vocabulary across methods, the gradient norm, and the token throughput over the logging window."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA

from ulma_lightning import PointwiseDataModule, ULMAModule
from ulma_lightning.losses import dpo_loss, kto_loss, pointwise_dpo_loss
from ulma_lightning.policy import PolicyConfig

SHARED_NAMES = {"rewards/positive", "rewards/negative", "logps/positive", "logps/negative"}


@pytest.mark.integration
def test_short_precomputed_run_shows_progress_warns_on_cpu_mixed_precision_logs_grad_norm_and_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA, reference="precomputed"))
    data = PointwiseDataModule(
        train="demo://binary?n=24", test="demo://binary?split=test&n=4", val_fraction=0.25, batch_size=8, max_length=48
    )
    trainer = pl.Trainer(
        max_steps=2,  # of a 3-batch epoch: stops before the epoch's end, where validation was due
        limit_val_batches=1,
        num_sanity_val_steps=0,
        precision="bf16-mixed",
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="bf16-mixed on CPU"):
        trainer.fit(module, datamodule=data)
    err = capsys.readouterr().err
    assert "reference log-probs (train)" in err and "reference log-probs (val)" in err
    norm = trainer.callback_metrics["train/grad_norm"]
    assert torch.isfinite(norm) and norm > 0
    assert "val/loss" in trainer.callback_metrics  # the run's end (max_steps) validates


def test_pairwise_and_pointwise_methods_log_one_metric_vocabulary() -> None:
    a, b, c, d = (
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.5, -1.0]),
        torch.tensor([-1.2, -1.8]),
        torch.tensor([-1.4, -1.1]),
    )
    scores = torch.tensor([1.0, 0.0])
    dpo = set(dpo_loss(a, b, c, d).metrics)
    assert SHARED_NAMES | {"rewards/accuracy", "rewards/margin"} <= dpo, dpo
    for out in (pointwise_dpo_loss(a, c, scores), kto_loss(a, c, scores, b, d)):
        assert SHARED_NAMES <= set(out.metrics), set(out.metrics)


def test_throughput_is_measured_over_the_logging_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from ulma_lightning import callbacks

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 12.0, 12.0, 13.0])  # step times 1 s, 1 s, 10 s (a hiccup), 1 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    logged: list[float] = []
    module = SimpleNamespace(log=lambda name, value, **kw: logged.append(value))
    batch = {"attention_mask": torch.ones(2, 50)}  # 100 tokens
    meter = callbacks.TokenThroughput()
    for written in (False, False, True, False):  # log_every_n_steps 3: the third step's value is written
        trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=written))
        meter.on_train_batch_start(trainer, module, batch, 0)
        meter.on_train_batch_end(trainer, module, None, batch, 0)
    assert logged == [100.0, 100.0, 300 / 12, 100.0]  # the written value covers its window, not the slow step alone
