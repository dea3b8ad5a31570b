"""The step skeleton every method shares: policy, optimizer and schedule, logging, precomputed references."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ulma_lightning.losses import LossOutput
from ulma_lightning.policy import Policy, PolicyConfig

Stage = Literal["train", "val", "test"]
REFERENCE_PREFIX = "policy.reference_model."

# The frozen reference model is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, then cosine, linear or constant decay (per optimizer step).

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam's betas.
        eps: Adam's epsilon.
        warmup_steps: warm-up length in optimizer steps (wins over ``warmup_ratio`` when > 0).
        warmup_ratio: warm-up length as a share of all training steps.
        schedule: decay after warm-up: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: the learning rate at the end of the decay, as a share of ``lr``.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of ``lr`` at optimizer step ``step`` of ``total``."""
        warmup = self.warmup_steps or int(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


class AlignmentModule(pl.LightningModule):
    """Base of every method: subclasses implement :meth:`compute_loss` (and usually a ``loss`` hook).

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
    """

    def __init__(self, policy: PolicyConfig, optimizer: OptimizerConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy = Policy(policy)
        self.optimizer_config = optimizer or OptimizerConfig()

    @property
    def tokenizer(self) -> Any:
        return self.policy.tokenizer

    # ------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the policy (and reference); under FSDP2 (a device mesh) shard both per block."""
        self.policy.build()
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            from ulma_lightning.sharding import data_parallel_mesh, shard_options_for, shard_policy

            strategy = self._trainer.strategy if self._trainer is not None else None
            shard_policy(self.policy, data_parallel_mesh(mesh), **shard_options_for(strategy))

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        """The objective on one batch; the only method a new loss must provide."""
        raise NotImplementedError

    @property
    def needs_reference(self) -> bool:
        """Whether the objective uses reference log-probs at all."""
        return True

    @property
    def average_logps(self) -> bool:
        """Per-token mean (True) or summed (False) sequence log-probs."""
        return bool(getattr(self.hparams, "average_logps", False))

    # ------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _shared_step(self, batch: dict[str, Tensor], stage: Stage) -> Tensor:
        out = self.compute_loss(batch, stage)
        self.log_step(out, batch, stage)
        return out.loss

    def log_step(self, out: LossOutput, batch: dict[str, Tensor], stage: Stage) -> None:
        """Log ``{stage}/loss`` and every metric of the loss, per step (train) and per epoch."""
        size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else None
        on_step = stage == "train"
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss.detach(), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=sync)
        for name, value in out.metrics.items():
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=True, batch_size=size, sync_dist=sync)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sample policy log-probs (generation lives in the evaluation tools)."""
        return {"index": batch["index"], "policy_logps": self.policy.logps(batch, average=self.average_logps)}

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        total = max(1, int(self.planned_steps()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def planned_steps(self) -> int | float:
        """Optimizer steps of the whole fit, for the schedule, without building the train loader.

        ``trainer.estimated_stepping_batches`` builds the fit loop's train loader when asked before
        the checkpoint is restored, and Lightning then never restores that loader's position
        (Lightning issue #20550): a resumed run would restart its epoch. The count comes from the
        data module's ``train_batches_per_epoch()`` instead, with Lightning's arithmetic.
        """
        trainer = self.trainer
        per_epoch = getattr(trainer.datamodule, "train_batches_per_epoch", None)
        if trainer.max_epochs in (None, -1) or per_epoch is None or trainer.fit_loop._combined_loader is not None:
            return trainer.estimated_stepping_batches
        batches = per_epoch()
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------ precomputed reference
    def on_fit_start(self) -> None:
        if not (self.needs_reference and self.policy.config.reference == "precomputed"):
            return
        if self.trainer.strategy.restore_checkpoint_after_setup:
            # FSDP/FSDP2: Lightning restores the checkpoint (with the saved column) after this hook;
            # compute when the first data loader is requested, by then a resumed run has its values
            self.trainer.datamodule.run_before_loading(self.precompute_reference_logps)
        else:
            self.precompute_reference_logps()

    def precompute_reference_logps(self) -> None:
        """Compute reference log-probs once for every train/val/test sample and attach them to the data.

        Each process computes its own share (samples ``rank, rank + W, ...``) under the run's
        strategy, in the same number of batches on every process (sharded models gather their
        weights in every forward); the shares are summed across processes so every rank holds the
        whole column. The values travel in checkpoints (the data module's state), so a resumed run
        reuses them. The reference model is freed afterwards (kept under FSDP, where it is part of
        the wrapped module).
        """
        datamodule = self.trainer.datamodule
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if datamodule.sources.get("test") and "test" not in datamodule.datasets:
            datamodule.setup("test")  # a later `trainer.test` in this process finds its column ready
        for split in ("train", "val", "test"):
            if split not in datamodule.datasets or datamodule.has_column(split, "reference_logps"):
                continue
            dataset = datamodule.datasets[split]
            mine = list(range(rank, len(dataset), world))
            share = -(-len(dataset) // world)
            padded = mine + [mine[-1] if mine else 0] * (share - len(mine))  # equal batch counts on all ranks
            loader = DataLoader(Subset(dataset, padded), batch_size=datamodule.eval_batch_size, collate_fn=datamodule.collator)
            values = torch.zeros(len(dataset), device=self.device)
            done = 0
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.no_grad():
                    logps = self._run_wrapped("reference_batch_logps", batch)
                keep = slice(0, max(0, min(len(batch["index"]), len(mine) - done)))
                values[batch["index"][keep]] = logps[keep].to(values.dtype)
                done += len(batch["index"])
            values = self.trainer.strategy.reduce(values, reduce_op="sum")
            datamodule.set_column(split, "reference_logps", values)
        if not self._wrapped_by_fsdp():
            self.policy.reference_model = None

    def reference_batch_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """Reference log-probs of every row of ``batch`` (for the precomputed column)."""
        return self.policy.token_logps(batch, reference=True).per_sequence(self.average_logps)

    def _wrapped_by_fsdp(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _run_wrapped(self, method: str, *args: Any) -> Any:
        """Call ``self.<method>(*args)``, through the FSDP wrapper's forward when there is one.

        Outside a training step, FSDP (torch's FSDP1) has gathered only its blocks' weights, not
        the root's; routing the call through the wrapper's forward gathers them.
        """
        if self._wrapped_by_fsdp():
            strategy = self.trainer.strategy
            return strategy._forward_redirection(strategy.model, self, method, *args)
        return getattr(self, method)(*args)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Frozen reference weights are rebuilt from their source, not stored in checkpoints.

        Under FSDP (torch's FSDP1) they stay: its loader expects every key of the wrapped module.
        """
        if self._wrapped_by_fsdp():
            return
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith(REFERENCE_PREFIX):
                state.setdefault(key, value)
