"""Precomputed reference log-probs and FSDP routing, as functions of a module (composed into
:class:`~ulma_lightning.modules.base.AlignmentModule`): the reference model runs once before training
(``policy.reference: precomputed``), and a module method is called through torch's FSDP wrapper
outside a training step. What is stored is the method's declaration
(:attr:`~ulma_lightning.modules.spec.MethodSpec.precomputed_columns`), filled by the module's
``reference_columns`` (after its ``prepare_precompute``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

import ulma_lightning._compat as _compat
from ulma_lightning.data.contract import ModuleData


def progress(iterable: Any, desc: str, enabled: bool = True) -> Any:
    """``iterable`` with a progress bar on stderr (for phases outside Lightning's loops)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True)


def data_module_of(module: pl.LightningModule) -> ModuleData | None:
    """The trainer's data module, through what modules may use of it (:class:`ModuleData`); None
    without a trainer or a data module."""
    return getattr(_compat.attached_trainer(module), "datamodule", None)


def schedule_reference_precompute(module: Any) -> None:
    """At fit start: compute the reference columns now, or, under FSDP/FSDP2 (where Lightning
    restores a checkpoint, with the saved columns, after ``on_fit_start``), when the first data
    loader is requested. Nothing unless the method needs a reference in ``precomputed`` mode."""
    if not (module.spec.needs_reference and module.policy.config.reference == "precomputed"):
        return
    if module.trainer.strategy.restore_checkpoint_after_setup:
        module.data_module.run_before_loading(lambda: precompute_reference_logps(module))
    else:
        precompute_reference_logps(module)


def precompute_reference_logps(module: Any) -> None:
    """Compute reference values once for every train/val/test sample and attach them to the data.

    Each process computes its own share (samples ``rank, rank + W, ...``) under the run's
    strategy and precision (``bf16-mixed``: the autocast of the training step, so the values
    equal what a ``copy`` reference gives in the step), in the same number of batches on every
    process (sharded models gather their weights in every forward); the shares are summed across
    processes so every rank holds the whole column. The values travel in checkpoints (the data
    module's state), so a resumed run reuses them. The reference model is freed afterwards (kept
    under FSDP, where it is part of the wrapped module).
    """
    datamodule = module.data_module
    assert datamodule is not None, "precomputing the reference needs a data module"
    trainer = module.trainer
    world, rank = trainer.world_size, trainer.global_rank
    names = module.spec.precomputed_columns
    if datamodule.has_split("test") and "test" not in datamodule.datasets:
        datamodule.setup("test")  # a later `trainer.test` in this process finds its column ready
    for split in ("train", "val", "test"):
        if split not in datamodule.datasets or all(datamodule.has_column(split, n) for n in names):
            continue
        module.prepare_precompute(split)
        dataset = datamodule.datasets[split]
        mine = list(range(rank, len(dataset), world))
        share = -(-len(dataset) // world)
        padded = mine + [mine[-1] if mine else 0] * (share - len(mine))  # equal batch counts on all ranks
        loader = DataLoader(
            Subset(dataset, padded), batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collator
        )
        values = {name: torch.zeros(len(dataset), device=module.device) for name in names}
        done = 0
        for batch in progress(loader, f"reference log-probs ({split})", trainer.is_global_zero):
            batch = {k: v.to(module.device) for k, v in batch.items()}
            with torch.no_grad(), trainer.precision_plugin.forward_context():  # as in training (e.g. bf16 autocast)
                columns = run_wrapped(module, "reference_columns", batch, split)
            keep = slice(0, max(0, min(len(batch["index"]), len(mine) - done)))  # not the padding
            for name, column in columns.items():
                values[name][batch["index"][keep]] = column[keep].to(values[name].dtype)
            done += len(batch["index"])
        for name in names:
            datamodule.set_column(split, name, trainer.strategy.reduce(values[name], reduce_op="sum"))
    if not wrapped_by_fsdp(module):
        module.policy.reference_model = None


def wrapped_by_fsdp(module: pl.LightningModule) -> bool:
    """Whether torch's FSDP1 (Lightning's ``FSDPStrategy``) wraps ``module``."""
    from lightning.pytorch.strategies import FSDPStrategy

    return _compat.attached_trainer(module) is not None and isinstance(module.trainer.strategy, FSDPStrategy)


def run_wrapped(module: pl.LightningModule, method: str, *args: Any) -> Any:
    """Call ``module.<method>(*args)``, through the FSDP wrapper's forward when there is one.

    Outside a training step, FSDP (torch's FSDP1) has gathered only its blocks' weights, not
    the root's; routing the call through the wrapper's forward gathers them.
    """
    if wrapped_by_fsdp(module):
        strategy = module.trainer.strategy
        return _compat.forward_redirection(strategy, module, method, *args)
    return getattr(module, method)(*args)
