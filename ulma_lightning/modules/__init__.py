"""One LightningModule per method; ``base`` holds the shared step skeleton."""

from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig
from ulma_lightning.modules.pointwise import PointwiseDPOModule, PointwiseModule
from ulma_lightning.modules.ulma import ULMAModule

__all__ = ["AlignmentModule", "OptimizerConfig", "PointwiseModule", "PointwiseDPOModule", "ULMAModule"]
