"""Options a module checks when it is built: out-of-range or unknown values of ULMA's options,
point-wise DPO's threshold passed on to its loss, and a model family whose logits are rescaled
(refused when the policy builds it)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_LLAMA
from ulma_lightning import PolicyConfig, ULMAModule
from ulma_lightning.modules.pointwise import PointwiseDPOModule
from ulma_lightning.policy import Policy


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
    module = PointwiseDPOModule(
        PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"), label_type="continuous", positive_threshold=0.5
    )
    out = module.loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([0.6, 0.1]))
    assert out.metrics["positive_fraction"].item() == pytest.approx(0.5)


def test_models_that_rescale_logits_are_refused() -> None:
    config = dict(TINY_LLAMA, model_type="granite", logits_scaling=8.0)
    policy = Policy(PolicyConfig(model_config=config, tokenizer="builtin:demo", reference="none"))
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        policy.build()
