"""ulma-lightning: align causal language models with demonstrations and point-wise feedback."""

from ulma_lightning.data import AlignmentDataModule, DataError, DemonstrationDataModule, PairwiseDataModule, PointwiseDataModule, PromptDataModule
from ulma_lightning.losses import (
    LossOutput,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    pointwise_dpo_loss,
    pointwise_reward_loss,
    sft_loss,
    ulma_loss,
    unlikelihood_loss,
)
from ulma_lightning.modules import (
    AlignmentModule,
    DPOModule,
    KTOModule,
    OptimizerConfig,
    PointwiseDPOModule,
    PointwiseModule,
    PPOModule,
    RewardModelModule,
    RLOOModule,
    RolloutModule,
    SFTModule,
    ULMAModule,
    UnlikelihoodModule,
)
from ulma_lightning.policy import LoraSettings, Policy, PolicyConfig, PretrainedModel

__version__ = "0.1.0"

__all__ = [
    "AlignmentDataModule",
    "AlignmentModule",
    "DataError",
    "DemonstrationDataModule",
    "DPOModule",
    "KTOModule",
    "PairwiseDataModule",
    "PPOModule",
    "PromptDataModule",
    "RLOOModule",
    "RolloutModule",
    "RewardModelModule",
    "SFTModule",
    "UnlikelihoodModule",
    "bradley_terry_loss",
    "pointwise_reward_loss",
    "unlikelihood_loss",
    "LoraSettings",
    "LossOutput",
    "OptimizerConfig",
    "Policy",
    "PolicyConfig",
    "PretrainedModel",
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
