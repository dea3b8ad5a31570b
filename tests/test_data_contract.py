"""Every data module of the library provides what a method's module may use of it
(:class:`~ulma_lightning.data.contract.ModuleData`)."""

from __future__ import annotations

import pytest

from ulma_lightning import DemonstrationDataModule, PairwiseDataModule, PointwiseDataModule, PromptDataModule
from ulma_lightning.data.contract import ModuleData

MEMBERS = sorted(name for name in {*ModuleData.__annotations__, *vars(ModuleData)} if not name.startswith("_"))


def test_the_contract_names_what_modules_use() -> None:
    assert {
        "datasets",
        "collator",
        "eval_batch_size",
        "set_column",
        "has_column",
        "run_before_loading",
        "source_of",
    } <= set(MEMBERS)


@pytest.mark.parametrize("cls", [PointwiseDataModule, DemonstrationDataModule, PairwiseDataModule, PromptDataModule])
def test_data_modules_provide_the_contract(cls: type) -> None:
    datamodule = cls(train="demo://binary?n=8", tokenizer="builtin:demo")
    missing = [name for name in MEMBERS if not hasattr(datamodule, name)]
    assert missing == []
    assert callable(datamodule.collator) and isinstance(datamodule.datasets, dict)
