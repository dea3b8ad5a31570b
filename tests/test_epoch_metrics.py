"""Epoch values of subset metrics (``val/logps/positive``, ...) are means over the epoch's samples of
that subset, not means of per-batch means: a batch with one positive (or none) weighs by that count."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA, make_pointwise_batch

from ulma_lightning import KTOModule, PolicyConfig, ULMAModule
from ulma_lightning.losses import subset_counts, ulma_loss

SCORES = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def validate(module: pl.LightningModule, batches: list[dict]) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def perturbed(module: pl.LightningModule) -> pl.LightningModule:
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


@pytest.mark.integration
@pytest.mark.parametrize("cls", [ULMAModule, KTOModule])
def test_epoch_means_weigh_batches_by_subset_size(demo_tokenizer, cls) -> None:
    module = perturbed(cls(policy=PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo")))
    batches = [make_pointwise_batch(demo_tokenizer, scores) for scores in SCORES]
    logged = validate(module, batches)

    module.eval()
    logps, rewards, positive = [], [], []
    with torch.no_grad():
        for batch in batches:
            if cls is KTOModule:
                policy, reference = (
                    module.policy.logps(batch, average=False),
                    module.policy.reference_logps(batch, average=False),
                )
            else:
                policy = module.policy.logps(batch, average=module.average_logps)
                reference = module.policy.reference_logps(batch, average=module.average_logps)
            logps.append(policy)
            rewards.append(module.beta * (policy - reference))
            positive.append(batch["score"] >= 1)
    logps_all, rewards_all, positive_all = torch.cat(logps), torch.cat(rewards), torch.cat(positive)
    for subset, mask in (("positive", positive_all), ("negative", ~positive_all)):
        assert logged[f"val/logps/{subset}"] == pytest.approx(float(logps_all[mask].mean()), rel=1e-5)
        assert logged[f"val/rewards/{subset}"] == pytest.approx(float(rewards_all[mask].mean()), rel=1e-4, abs=1e-6)
    # the old weighting (every batch by its size, an empty subset counting as 0) gives another value
    by_batch = sum(float(lp[p].mean()) if p.any() else 0.0 for lp, p in zip(logps, positive)) / len(batches)
    assert not math.isclose(logged["val/logps/positive"], by_batch, rel_tol=1e-3)
    assert logged["val/positive_fraction"] == pytest.approx(float(positive_all.float().mean()))


def test_loss_parts_weigh_by_subset_only_under_subset_mean() -> None:
    positive = torch.tensor([True, False, False])
    assert subset_counts(positive, "subset_mean")["loss/positive"] == 1
    assert "loss/positive" not in subset_counts(positive, "mean")  # a share of the batch mean: batch size
    logps = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([float("nan"), -2.5, -2.5])  # ULMA training: no reference on positives
    out = ulma_loss(logps, reference, positive.float())
    assert int(out.counts["rewards/negative"]) == 2 and int(out.counts["rewards/positive"]) == 0
    assert "rewards/positive" not in out.metrics
