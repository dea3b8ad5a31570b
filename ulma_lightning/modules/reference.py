"""Precomputed reference log-probs and FSDP routing: the part of every method's module that runs
the reference model once before training (``policy.reference: precomputed``) and calls a module
method through torch's FSDP wrapper outside a training step. :class:`ReferencePrecompute` is a base
of :class:`~ulma_lightning.modules.base.AlignmentModule`; a method customises it by overriding
:attr:`~ReferencePrecompute.precomputed_columns`, :meth:`~ReferencePrecompute.reference_columns` and
:meth:`~ReferencePrecompute.prepare_precompute`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

import ulma_lightning._compat as _compat
from ulma_lightning.data.contract import ModuleData


def progress(iterable: Any, desc: str, enabled: bool = True) -> Any:
    """``iterable`` with a progress bar on stderr (for phases outside Lightning's loops)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, dynamic_ncols=True)


class ReferencePrecompute(pl.LightningModule):
    """Precomputing reference values into the data, and routing calls through torch's FSDP wrapper.

    Relies on the module's ``policy`` (a :class:`~ulma_lightning.policy.Policy`), ``needs_reference``
    and ``average_logps``, and on the data module's :class:`~ulma_lightning.data.contract.ModuleData`
    contract.
    """

    @property
    def data_module(self) -> ModuleData | None:
        """The trainer's data module, through what modules may use of it (:class:`ModuleData`); None
        without a trainer or a data module."""
        return getattr(_compat.attached_trainer(self), "datamodule", None)

    def schedule_reference_precompute(self) -> None:
        """At fit start: compute the reference columns now, or, under FSDP/FSDP2 (where Lightning
        restores a checkpoint, with the saved columns, after ``on_fit_start``), when the first data
        loader is requested. Nothing unless the objective needs a reference in ``precomputed`` mode."""
        if not (self.needs_reference and self.policy.config.reference == "precomputed"):  # type: ignore[attr-defined]
            return
        if self.trainer.strategy.restore_checkpoint_after_setup:
            self.data_module.run_before_loading(self.precompute_reference_logps)  # type: ignore[union-attr]
        else:
            self.precompute_reference_logps()

    @property
    def precomputed_columns(self) -> tuple[str, ...]:
        """Names of the per-sample columns :meth:`reference_columns` returns."""
        return ("reference_logps",)

    def reference_columns(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """Per-sample values computed once with the reference model in ``precomputed`` mode, keyed by
        :attr:`precomputed_columns`; each value has shape ``(B,)`` and is stored with the sample.

        Point-wise methods store ``reference_logps``; pairwise DPO overrides this to store
        ``reference_chosen_logps`` and ``reference_rejected_logps``.
        """
        return {"reference_logps": self.policy.reference_model_logps(batch, average=self.average_logps)}

    def prepare_precompute(self, split: str) -> None:
        """Called before the reference pass over ``split``, e.g. to attach columns it needs."""

    def precompute_reference_logps(self) -> None:
        """Compute reference values once for every train/val/test sample and attach them to the data.

        Each process computes its own share (samples ``rank, rank + W, ...``) under the run's
        strategy and precision (``bf16-mixed``: the autocast of the training step, so the values
        equal what a ``copy`` reference gives in the step), in the same number of batches on every
        process (sharded models gather their weights in every forward); the shares are summed across processes so every rank holds the
        whole column. The values travel in checkpoints (the data module's state), so a resumed run
        reuses them. The reference model is freed afterwards (kept under FSDP, where it is part of
        the wrapped module).
        """
        datamodule = self.data_module
        assert datamodule is not None, "precomputing the reference needs a data module"
        world, rank = self.trainer.world_size, self.trainer.global_rank
        names = self.precomputed_columns
        if datamodule.has_split("test") and "test" not in datamodule.datasets:
            datamodule.setup("test")  # a later `trainer.test` in this process finds its column ready
        for split in ("train", "val", "test"):
            if split not in datamodule.datasets or all(datamodule.has_column(split, n) for n in names):
                continue
            self.prepare_precompute(split)
            dataset = datamodule.datasets[split]
            mine = list(range(rank, len(dataset), world))
            share = -(-len(dataset) // world)
            padded = mine + [mine[-1] if mine else 0] * (share - len(mine))  # equal batch counts on all ranks
            loader = DataLoader(Subset(dataset, padded), batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collator)
            values = {name: torch.zeros(len(dataset), device=self.device) for name in names}
            done = 0
            for batch in progress(loader, f"reference log-probs ({split})", self.trainer.is_global_zero):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.no_grad(), self.trainer.precision_plugin.forward_context():  # as in training (e.g. bf16 autocast)
                    columns = self._run_wrapped("reference_columns", batch, split)
                keep = slice(0, max(0, min(len(batch["index"]), len(mine) - done)))  # not the padding
                for name, column in columns.items():
                    values[name][batch["index"][keep]] = column[keep].to(values[name].dtype)
                done += len(batch["index"])
            for name in names:
                datamodule.set_column(split, name, self.trainer.strategy.reduce(values[name], reduce_op="sum"))
        if not self._wrapped_by_fsdp():
            self.policy.reference_model = None

    def _wrapped_by_fsdp(self) -> bool:
        """Whether torch's FSDP1 (Lightning's ``FSDPStrategy``) wraps this module."""
        from lightning.pytorch.strategies import FSDPStrategy

        return _compat.attached_trainer(self) is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _run_wrapped(self, method: str, *args: Any) -> Any:
        """Call ``self.<method>(*args)``, through the FSDP wrapper's forward when there is one.

        Outside a training step, FSDP (torch's FSDP1) has gathered only its blocks' weights, not
        the root's; routing the call through the wrapper's forward gathers them.
        """
        if self._wrapped_by_fsdp():
            strategy = self.trainer.strategy
            return _compat.forward_redirection(strategy, self, method, *args)
        return getattr(self, method)(*args)
