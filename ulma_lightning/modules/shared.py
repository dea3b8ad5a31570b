"""The pieces both method bases hold, as functions of a module: the offline
:class:`~ulma_lightning.modules.base.AlignmentModule` (a supervised step) and
:class:`~ulma_lightning.modules.rollout.RolloutModule` (a rollout step) are sibling LightningModules,
and each one's hooks call these, so neither inherits the other's step. Here: the declaration's options,
the policy's build and FSDP2 sharding, the optimizer and its schedule (:class:`OptimizerConfig`), the
gradient norm, ``max_steps``, generation for ``predict``, and the checkpoint records."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import types
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

import ulma_lightning._compat as _compat
from ulma_lightning.checkpointing import (
    DATA_CLASS_KEY,
    MODULE_CLASS_KEY,
    check_resume_options,
    check_same_classes,
    class_path,
    keep_unfinished_epoch,
)
from ulma_lightning.compiling import check_strategy
from ulma_lightning.evaluation.generation import generate_responses
from ulma_lightning.modules.reference import data_module_of, wrapped_by_fsdp
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test"]
REFERENCE_PREFIX = "policy.reference_model."
SCHEDULE_STEPS_KEY = "ulma_schedule_steps"  # the steps the checkpointed run's schedule spanned
OPTION_FIELDS = ("average_logps", "label_type")  # MethodSpec fields a constructor option of that name sets


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
        schedule_steps: optimizer steps the warm-up and decay span; default: the fit's planned steps
            (``max_steps``, or ``max_epochs`` of batches). Set it to stop a run early with
            ``max_steps`` and continue it later exactly as one run of ``schedule_steps``.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        check_numbers(
            lr=(self.lr, ">= 0"), weight_decay=(self.weight_decay, ">= 0"), eps=(self.eps, "> 0"),
            warmup_steps=(self.warmup_steps, ">= 0"), warmup_ratio=(self.warmup_ratio, "in [0, 1)"),
            min_lr_ratio=(self.min_lr_ratio, "in [0, 1]"), schedule_steps=(self.schedule_steps, ">= 1"),
            **{f"betas[{i}]": (b, "in [0, 1)") for i, b in enumerate(self.betas)},
        )  # fmt: skip

    def used_span(self, steps: int) -> bool:
        """Whether the learning rate of the first ``steps`` steps depended on the schedule's span."""
        if not self.warmup_steps and self.warmup_ratio:
            return steps > 0
        return self.schedule != "constant" and steps > self.warmup_steps

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of ``lr`` at optimizer step ``step`` of ``total``."""
        warmup = self.warmup_steps or int(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if self.schedule == "constant":
            return 1.0
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * done)) if self.schedule == "cosine" else 1 - done
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


# ------------------------------------------------------------ the declaration and the policy
def spec_view(field: str) -> Any:
    """A read-only property that reads ``module.spec.<field>``: how :class:`AlignmentModule` and
    :class:`RolloutModule` both show their declaration (``needs_reference``, ``average_logps``, ...)."""

    def read(module: Any) -> Any:
        return getattr(module.spec, field)

    return property(read, doc=f"The declaration's ``{field}`` (:attr:`MethodSpec.{field}`), read-only.")


def save_hyperparameters(module: pl.LightningModule, frame: types.FrameType | None) -> None:
    """``module.save_hyperparameters`` (from a base's ``__init__``, ``frame``) with only the arguments
    of the module's own class's constructor.

    Lightning merges the arguments of every ``__init__`` on the way up, so a value a subclass passes
    to its parent under the parent's name stays there too (RLOO's ``rloo_k`` also as
    ``samples_per_prompt``, online ULMA's ``beta`` as ``kl_coef``), and ``type(module)(**hparams)``
    (``ulma export``, ``load_from_checkpoint``) is then refused by the subclass's own check. The
    arguments of the constructors between the class's own and the base's that the class's own was
    not given are left out: without them ``hparams`` are exactly what rebuilds the module.
    """
    frames, outer = [], frame
    while outer is not None and outer.f_code.co_name == "__init__" and outer.f_locals.get("self") is module:
        frames.append(inspect.getargvalues(outer))
        outer = outer.f_back

    def names(arguments: inspect.ArgInfo) -> set[str]:
        return set(arguments.args) | set(arguments.locals[arguments.keywords] if arguments.keywords else ())

    own = names(frames[-1]) if frames else set()
    parents_only = {name for arguments in frames[:-1] for name in names(arguments)} - own - {"self"}
    module.save_hyperparameters(ignore=["spec", "_spec", *sorted(parents_only)], frame=frame)


def method_spec(module: pl.LightningModule, spec: MethodSpec, policy: PolicyConfig) -> MethodSpec:
    """``spec`` with the module's constructor options named ``average_logps`` or ``label_type`` (not
    None; read from its hyper-parameters), checked against ``policy.reference`` once."""
    options = {name: module.hparams[name] for name in OPTION_FIELDS if module.hparams.get(name) is not None}
    spec = dataclasses.replace(spec, **options)
    spec.check_reference_mode(policy.reference, type(module).__name__)
    return spec


def configure_policy(module: Any) -> None:
    """``configure_model``: build the policy (no reference when the declaration needs none), check
    ``data.max_length``, and under FSDP2 (ModelParallelStrategy) shard policy and reference per block."""
    config = module.policy.config
    if not module.spec.needs_reference and config.reference != "none":
        log.info(
            "%s uses no reference model: policy.reference %r is treated as 'none'",
            type(module).__name__,
            config.reference,
        )
        config.reference = "none"
    trainer = _compat.attached_trainer(module)
    if config.compile and trainer is not None:
        check_strategy(trainer.strategy)
    module.policy.build()
    check_max_length(module)
    mesh = module.device_mesh
    if mesh is not None:
        from ulma_lightning.sharding import data_parallel_mesh, shard_options_for, shard_policy

        shard_policy(module.policy, data_parallel_mesh(mesh), **shard_options_for(getattr(trainer, "strategy", None)))


def check_max_length(module: Any) -> None:
    """Refuse ``data.max_length`` above the model's ``max_position_embeddings`` when the data has a
    sample longer than the model's positions (past them a model computes garbage, with only a
    transformers warning). Data that fits the positions trains, whatever ``max_length`` allows."""
    positions = getattr(getattr(module.policy.model, "config", None), "max_position_embeddings", None)
    data = data_module_of(module)
    max_length = getattr(data, "max_length", None)
    if not isinstance(positions, int) or not isinstance(max_length, int) or max_length <= positions:
        return
    longest = {
        split: max(dataset.lengths(), default=0)
        for split, dataset in data.datasets.items()  # type: ignore[union-attr]
        if hasattr(dataset, "lengths")
    }
    over = {split: n for split, n in longest.items() if n > positions}
    if over:
        split = max(over, key=over.__getitem__)
        model = module.policy.config.model or "the model built from policy.model_config"
        raise ValueError(
            f"data.max_length {max_length} is above the model's max_position_embeddings {positions} ({model}), and the "
            f"{split} split has samples of up to {over[split]} tokens, which the model has no positions for: set "
            f"data.max_length to {positions} or less (--data.init_args.max_length)"
        )


# ------------------------------------------------------------ steps
def stop_at_max_steps(trainer: pl.Trainer) -> None:
    """At the step that reaches ``max_steps``, ask Lightning to stop, which also runs validation:
    a run shorter than its validation interval (e.g. 30 steps of a long epoch with
    ``val_check_interval: 0.5``) still ends with validation metrics and a checkpoint to compare."""
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        trainer.should_stop = True


def predict(module: Any, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
    """Generated responses for prompt-only batches (``{index, response}``), with the settings in
    ``module.generation``; for batches with ``labels`` (a user's own loader of full sequences),
    per-sample policy log-probs."""
    if "labels" in batch:
        return {"index": batch["index"], "policy_logps": module.policy.logps(batch, average=module.spec.average_logps)}
    responses = generate_responses(
        module.policy.model,
        module.policy.tokenizer,
        batch["input_ids"],
        batch["attention_mask"],
        module.generation,
        seed_offset=batch_idx,
        synced=getattr(module.policy, "lockstep", False),
    )
    return {"index": batch["index"], "response": responses}


# ------------------------------------------------------------ optimizer and schedule
def gradient_norm(module: Any) -> Tensor:
    """The L2 norm of every parameter's gradient; under FSDP and FSDP2, over all shards."""
    squares = [
        (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).float().square().sum()
        for p in module.parameters()
        if p.grad is not None
    ]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=module.device)
    if wrapped_by_fsdp(module) or module.device_mesh is not None:
        total = module.trainer.strategy.reduce(total, reduce_op="sum")  # disjoint shards: squares add up
    return total.sqrt()


def build_optimizer(module: Any, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no weight decay on biases and norms).

    The fused kernel (one pass over all parameters) is used where torch supports it: ordinary
    float32 tensors on CPU or CUDA; sharded (DTensor) parameters keep the default kernel, and so
    does ``16-mixed`` (loss scaling: gradients are unscaled before clipping, which a fused kernel
    that unscales internally does not allow).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    scaled = (
        _compat.attached_trainer(module) is not None
        and getattr(module.trainer.precision_plugin, "scaler", None) is not None
    )
    fused = (
        bool(params)
        and not scaled
        and all(
            type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.dtype == torch.float32
            for p in params
        )
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None
    )


def with_schedule(module: Any, optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> dict[str, Any]:
    """``configure_optimizers``' answer: ``optimizer`` with the warm-up and decay of ``cfg`` (one
    scheduler step per optimizer step) over ``cfg.schedule_steps`` or the fit's :func:`planned_steps`.
    The span is recorded on the module (``_schedule_steps``) for its checkpoints."""
    total = cfg.schedule_steps or max(1, int(planned_steps(module)))
    check_resumed_schedule(module, cfg, total)
    module._schedule_steps = total
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_resumed_schedule(module: Any, cfg: OptimizerConfig, total: int) -> None:
    """Warn when a resumed run's schedule spans other steps than the checkpointed run's did, after
    the learning rate began to depend on it (the continuation then differs from one whole run)."""
    saved, step = getattr(module, "_resumed_schedule", (None, 0))
    if saved and saved != total and cfg.used_span(step):
        warnings.warn(
            f"the checkpoint's learning-rate schedule spanned {saved} steps, this run's spans {total}: its "
            f"{step} steps so far followed the old one, so the run will not equal one uninterrupted run of "
            f"{total} steps. To continue exactly, set model.init_args.optimizer.schedule_steps to the full "
            "length before the first run, or stop runs with max_time instead of max_steps",
            stacklevel=3,
        )


def planned_steps(module: Any) -> int | float:
    """Optimizer steps of the whole fit, for the schedule, without building the train loader.

    ``trainer.estimated_stepping_batches`` builds the fit loop's train loader when asked before
    the checkpoint is restored, and Lightning then never restores that loader's position
    (Lightning issue #20550): a resumed run would restart its epoch. The count comes from the
    data module's ``train_batches_per_epoch()`` instead, with Lightning's arithmetic.
    """
    trainer = module.trainer
    per_epoch = getattr(data_module_of(module), "train_batches_per_epoch", None)
    if trainer.max_epochs in (None, -1) or per_epoch is None or _compat.train_loader_built(trainer):
        return trainer.estimated_stepping_batches
    batches = per_epoch()
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


# ------------------------------------------------------------ checkpoints
def save_checkpoint(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: frozen reference weights are rebuilt from their source, not stored.

    Under FSDP (torch's FSDP1) they stay: its loader expects every key of the wrapped module.
    The module's class is recorded (``ulma_module_class``) for ``ulma export``, and the span of its
    learning-rate schedule. An epoch that fit left early (``max_steps``, ``max_time``) is recorded as
    unfinished, so a resumed run continues it (:func:`~ulma_lightning.checkpointing.keep_unfinished_epoch`).
    """
    checkpoint[MODULE_CLASS_KEY] = class_path(type(module))
    if getattr(module, "_schedule_steps", None) is not None:
        checkpoint[SCHEDULE_STEPS_KEY] = module._schedule_steps
    datamodule = data_module_of(module)
    checkpoint[DATA_CLASS_KEY] = class_path(type(datamodule)) if datamodule is not None else None
    keep_unfinished_epoch(checkpoint)
    if wrapped_by_fsdp(module):
        return
    state = checkpoint.get("state_dict", {})
    for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
        del state[key]


def load_checkpoint(module: Any, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: refuse another method's checkpoint, or (resuming ``fit``) other options;
    put back the reference weights it does not store; keep the schedule's span for
    :func:`check_resumed_schedule`."""
    datamodule = data_module_of(module)
    trainer = _compat.attached_trainer(module)
    source = str(getattr(trainer, "ckpt_path", None) or "(the checkpoint)")
    check_same_classes(checkpoint, type(module), type(datamodule) if datamodule is not None else None, source)
    if trainer is not None and trainer.state.fn == "fit":  # resuming: the options must be the checkpoint's
        check_resume_options(checkpoint.get("hyper_parameters") or {}, dict(module.hparams), source)
    module._resumed_schedule = (checkpoint.get(SCHEDULE_STEPS_KEY), int(checkpoint.get("global_step", 0)))
    state = checkpoint.setdefault("state_dict", {})
    for key, value in module.state_dict().items():
        if key.startswith(REFERENCE_PREFIX):
            state.setdefault(key, value)
