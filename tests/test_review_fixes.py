"""Regression tests for review findings: record-level hold-out, thresholds, option checks, logit scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA
from ulma_lightning import PointwiseDataModule, PolicyConfig, ULMAModule, pointwise_dpo_loss
from ulma_lightning.modules.pointwise import PointwiseDPOModule
from ulma_lightning.policy import Policy


def test_val_fraction_holds_out_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as handle:
        for i in range(40):
            record = {"prompt": f"Question number {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            handle.write(json.dumps(record) + "\n")
    data = PointwiseDataModule(train=str(path), val_fraction=0.3, tokenizer="builtin:demo", max_length=64)
    data.setup("fit")
    prompts = {}
    for split in ("train", "val"):
        examples = data.datasets[split].items
        assert len(examples) % 2 == 0  # both samples of each pair
        prompts[split] = {tuple(item["input_ids"][item["labels"] == -100].tolist()) for item in examples}
    assert not prompts["train"] & prompts["val"]
    assert len(prompts["val"]) == 12 and len(prompts["train"]) == 28


def test_pointwise_dpo_positive_threshold_splits_the_subsets() -> None:
    policy = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([-1.5, -1.0, -2.0])
    scores = torch.tensor([0.7, 0.2, 1.0])
    out = pointwise_dpo_loss(policy, reference, scores, label_type="continuous", positive_threshold=0.5, reduction="mean")
    u = 0.1 * (policy - reference)
    expected_first = math.log1p(math.exp(-float(u[0])))  # -log sigma(u): treated as a positive
    assert out.losses[0].item() == pytest.approx(expected_first, rel=1e-6)
    assert out.metrics["positive_fraction"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"positive_threshold": 4.0}, "score_range"),
        ({"beta": 0.0}, "beta"),
        ({"reduction": "sum"}, "reduction"),
        ({"positive_term": "dpo"}, "positive_term"),
    ],
)
def test_bad_module_options_fail_at_construction(kwargs: dict, message: str) -> None:
    config = PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo")
    with pytest.raises(ValueError, match=message):
        ULMAModule(config, **kwargs)


def test_pointwise_dpo_module_passes_its_threshold() -> None:
    module = PointwiseDPOModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"), label_type="continuous", positive_threshold=0.5)
    out = module.loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([0.6, 0.1]))
    assert out.metrics["positive_fraction"].item() == pytest.approx(0.5)


def test_models_that_rescale_logits_are_refused() -> None:
    config = dict(TINY_LLAMA, model_type="granite", logits_scaling=8.0)
    policy = Policy(PolicyConfig(model_config=config, tokenizer="builtin:demo", reference="none"))
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        policy.build()
