"""One LightningModule per method. Two sibling bases: ``base`` (:class:`AlignmentModule`, offline methods:
the supervised step) and ``rollout`` (:class:`RolloutModule`, online methods: the rollout step); the
pieces they share (policy, optimizer and schedule, checkpoints, export) are the functions of ``shared``."""

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

#: The bases of every method module, siblings (neither subclasses the other): ``ulma`` trains, exports and
#: compares a subclass of either. Check a class with ``issubclass(cls, METHOD_BASES)``.
METHOD_BASES: tuple[type, ...] = (AlignmentModule, RolloutModule)

__all__ = [
    "AlignmentModule",
    "METHOD_BASES",
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
