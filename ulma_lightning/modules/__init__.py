"""One LightningModule per method; ``base`` holds the shared step skeleton."""

from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig
from ulma_lightning.modules.dpo import DPOModule
from ulma_lightning.modules.grpo import GRPOModule
from ulma_lightning.modules.kto import KTOModule
from ulma_lightning.modules.online_ulma import OnlineULMAModule
from ulma_lightning.modules.pointwise import PointwiseDPOModule, PointwiseModule
from ulma_lightning.modules.ppo import PPOModule
from ulma_lightning.modules.reward import RewardModel, RewardModelModule
from ulma_lightning.modules.rloo import RLOOModule
from ulma_lightning.modules.rollout import RolloutModule
from ulma_lightning.modules.sft import SFTModule
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.modules.ulma import ULMAModule
from ulma_lightning.modules.unlikelihood import UnlikelihoodModule

__all__ = [
    "AlignmentModule",
    "MethodSpec",
    "OptimizerConfig",
    "PointwiseModule",
    "PointwiseDPOModule",
    "ULMAModule",
    "SFTModule",
    "DPOModule",
    "UnlikelihoodModule",
    "KTOModule",
    "RewardModel",
    "RewardModelModule",
    "RolloutModule",
    "PPOModule",
    "RLOOModule",
    "OnlineULMAModule",
    "GRPOModule",
]
