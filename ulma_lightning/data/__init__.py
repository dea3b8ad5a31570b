"""Record parsing and validation, tokenization, collation, DataModules and the demo task."""

from ulma_lightning.data.datamodule import AlignmentDataModule, PointwiseDataModule
from ulma_lightning.data.errors import DataError

__all__ = ["AlignmentDataModule", "PointwiseDataModule", "DataError"]
