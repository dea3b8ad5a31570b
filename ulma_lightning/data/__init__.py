"""Record parsing and validation, tokenization, collation, DataModules and the demo task."""

from ulma_lightning.data import demo, task  # noqa: F401, E402  (register the builtin:demo and builtin:task corpora)
from ulma_lightning.data.datamodule import AlignmentDataModule, PointwiseDataModule
from ulma_lightning.data.demonstration import DemonstrationDataModule
from ulma_lightning.data.errors import DataError
from ulma_lightning.data.pairwise import PairwiseDataModule
from ulma_lightning.data.prompt_data import PromptDataModule

__all__ = [
    "AlignmentDataModule",
    "PointwiseDataModule",
    "DemonstrationDataModule",
    "PairwiseDataModule",
    "PromptDataModule",
    "DataError",
]
