"""ulma-lightning: align causal language models with demonstrations and point-wise feedback."""

from ulma_lightning.data import AlignmentDataModule, DataError, PointwiseDataModule
from ulma_lightning.losses import LossOutput, dpo_loss, kto_loss, pointwise_dpo_loss, sft_loss, ulma_loss
from ulma_lightning.modules import AlignmentModule, OptimizerConfig, PointwiseDPOModule, PointwiseModule, ULMAModule
from ulma_lightning.policy import LoraSettings, Policy, PolicyConfig

__version__ = "0.1.0"

__all__ = [
    "AlignmentDataModule",
    "AlignmentModule",
    "DataError",
    "LoraSettings",
    "LossOutput",
    "OptimizerConfig",
    "Policy",
    "PolicyConfig",
    "PointwiseDataModule",
    "PointwiseDPOModule",
    "PointwiseModule",
    "ULMAModule",
    "dpo_loss",
    "kto_loss",
    "pointwise_dpo_loss",
    "sft_loss",
    "ulma_loss",
]
