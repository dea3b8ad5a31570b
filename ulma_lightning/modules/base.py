"""The offline methods' base, :class:`AlignmentModule`: a method is a declaration
(:class:`~ulma_lightning.modules.spec.MethodSpec`) and a loss; this file holds the step that turns a
batch into log-probs for that loss, and the policy, optimizer and schedule, logging, perplexity,
export and checkpoint pieces. Precomputed references and FSDP routing are functions in
:mod:`~ulma_lightning.modules.reference`, the reward metrics an object of
:mod:`~ulma_lightning.modules.implicit_rewards`."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

import ulma_lightning._compat as _compat
from ulma_lightning.checkpointing import DATA_CLASS_KEY, MODULE_CLASS_KEY, check_resume_options, check_same_classes, class_path, keep_unfinished_epoch
from ulma_lightning.compiling import check_strategy
from ulma_lightning.data.contract import ModuleData
from ulma_lightning.evaluation.generation import GenerationConfig, can_generate, generate_responses
from ulma_lightning.evaluation.metrics import TokenPerplexity, demonstration_rows, reuse_token_logps
from ulma_lightning.export import export_hf
from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.batching import pair_batch
from ulma_lightning.modules.implicit_rewards import RewardMetrics
from ulma_lightning.modules.reference import data_module_of, precompute_reference_logps, run_wrapped, schedule_reference_precompute, wrapped_by_fsdp
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import Policy, PolicyConfig, PretrainedModel, select_rows

log = logging.getLogger(__name__)

Stage = Literal["train", "val", "test"]
REFERENCE_PREFIX = "policy.reference_model."
SCHEDULE_STEPS_KEY = "ulma_schedule_steps"  # the steps the checkpointed run's schedule spanned
OPTION_FIELDS = ("average_logps", "label_type")  # MethodSpec fields a constructor option of that name sets

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
            min_lr_ratio=(self.min_lr_ratio, "in [0, 1]"), schedule_steps=(self.schedule_steps, ">= 1"), **{f"betas[{i}]": (b, "in [0, 1)") for i, b in enumerate(self.betas)},
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


def parent_only_arguments(module: pl.LightningModule, frame: types.FrameType | None) -> list[str]:
    """The arguments of the constructors between ``module``'s own class's and :class:`AlignmentModule`'s
    (``frame``) that its own constructor was not given: they are left out of ``module.hparams``.

    Lightning's ``save_hyperparameters`` merges the arguments of every ``__init__`` on the way up,
    so a value a subclass passes to its parent under the parent's name stays there too (RLOO's
    ``rloo_k`` also as ``samples_per_prompt``, online ULMA's ``beta`` as ``kl_coef``), and
    ``type(module)(**hparams)`` (``ulma export``, ``load_from_checkpoint``) is then refused by the
    subclass's own check. Without them ``hparams`` are exactly what rebuilds the module.
    """
    frames = []
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is module:
        frames.append(inspect.getargvalues(frame))
        frame = frame.f_back

    def names(arguments: inspect.ArgInfo) -> set[str]:
        return set(arguments.args) | set(arguments.locals[arguments.keywords] if arguments.keywords else ())

    own = names(frames[-1]) if frames else set()
    return sorted({name for arguments in frames[:-1] for name in names(arguments)} - own - {"self"})


class AlignmentModule(pl.LightningModule):
    """Base of every offline method: a method passes its declaration (:class:`MethodSpec`) to this
    constructor and implements one method, ``loss``, that maps log-probs to a
    :class:`~ulma_lightning.losses.LossOutput` through the pure functions of :mod:`ulma_lightning.losses`.

    The step (:meth:`compute_loss`) reads the batch's kind: for a point-wise batch (``score``) it
    calls ``loss(policy_logps, reference_logps, scores)``, the reference run on the rows
    :attr:`MethodSpec.reference` names (NaN on the others); for a pairwise batch
    ``loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)``, both sides in one
    forward. Sequence log-probs follow :attr:`MethodSpec.average_logps`; every reference mode works
    (``copy``, ``adapter``, ``precomputed``). A method whose loss needs something else (token
    log-probs, mismatched pairs, a scalar head) overrides :meth:`compute_loss` instead.

    Validation and test also log ``{stage}/perplexity`` of the held-out demonstrations (see
    :mod:`ulma_lightning.evaluation.metrics`), from the token log-probs the step computed: no extra
    forward when the step ran the policy on those rows (every built-in method does); otherwise one
    no-gradient forward on the demonstration rows. ``predict`` generates responses to prompt-only
    batches with the settings in :attr:`generation` (set by ``ulma predict``'s writer).

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        _spec: the method's declaration, when it depends on the method's options (default: the class's
            :attr:`spec`); private: not a config option. Constructor options named ``average_logps`` or ``label_type`` (not None)
            set those fields: an option is declared once, as a typed argument.
    """

    #: the method's declaration; a method whose needs depend on its options passes ``_spec`` instead
    spec: MethodSpec = MethodSpec()

    def __init__(self, policy: PolicyConfig, optimizer: OptimizerConfig | None = None, _spec: MethodSpec | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["spec", "_spec", *parent_only_arguments(self, inspect.currentframe())])
        options = {name: self.hparams[name] for name in OPTION_FIELDS if self.hparams.get(name) is not None}
        self.spec = dataclasses.replace(_spec or type(self).spec, **options)
        self.spec.check_reference_mode(policy.reference, type(self).__name__)
        self.policy = self.build_policy(policy)
        self.reward_metrics = RewardMetrics()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.eval_perplexity = nn.ModuleDict({stage: TokenPerplexity() for stage in ("val", "test")})
        self.generation = GenerationConfig()

    def build_policy(self, config: PolicyConfig) -> PretrainedModel:
        """The trained model, kept as ``self.policy``: a :class:`Policy`; a module with another kind
        of model returns its own :class:`PretrainedModel` (the reward model returns a
        :class:`~ulma_lightning.modules.reward.RewardModel`)."""
        return Policy(config)

    @property
    def tokenizer(self) -> Any:
        return self.policy.tokenizer

    # ------------------------------------------------------------ model
    def configure_model(self) -> None:
        config = self.policy.config
        if not self.spec.needs_reference and config.reference != "none":
            log.info("%s uses no reference model: policy.reference %r is treated as 'none'", type(self).__name__, config.reference)
            config.reference = "none"
        if config.compile and _compat.attached_trainer(self) is not None:
            check_strategy(_compat.attached_trainer(self).strategy)
        self.policy.build()
        self.check_max_length()
        mesh = self.device_mesh
        if mesh is not None:  # FSDP2 (ModelParallelStrategy): shard policy and reference per block
            from ulma_lightning.sharding import data_parallel_mesh, shard_options_for, shard_policy

            strategy = getattr(_compat.attached_trainer(self), "strategy", None)
            shard_policy(self.policy, data_parallel_mesh(mesh), **shard_options_for(strategy))

    def check_max_length(self) -> None:
        """Refuse ``data.max_length`` above the model's ``max_position_embeddings`` when the data has a
        sample longer than the model's positions (past them a model computes garbage, with only a
        transformers warning). Data that fits the positions trains, whatever ``max_length`` allows."""
        positions = getattr(getattr(self.policy.model, "config", None), "max_position_embeddings", None)
        data = self.data_module
        max_length = getattr(data, "max_length", None)
        if not isinstance(positions, int) or not isinstance(max_length, int) or max_length <= positions:
            return
        longest = {split: max(dataset.lengths(), default=0) for split, dataset in data.datasets.items() if hasattr(dataset, "lengths")}  # type: ignore[union-attr]
        over = {split: n for split, n in longest.items() if n > positions}
        if over:
            split = max(over, key=over.__getitem__)
            model = self.policy.config.model or "the model built from policy.model_config"
            raise ValueError(
                f"data.max_length {max_length} is above the model's max_position_embeddings {positions} ({model}), and the {split} split has "
                f"samples of up to {over[split]} tokens, which the model has no positions for: set data.max_length to {positions} or less "
                "(--data.init_args.max_length)"
            )

    # ------------------------------------------------------------ the declaration
    @property
    def data_module(self) -> ModuleData | None:
        """The trainer's data module, through what modules may use of it (:class:`ModuleData`); None
        without a trainer or a data module."""
        return data_module_of(self)

    @property
    def needs_reference(self) -> bool:
        """Whether the method uses reference log-probs at all (:attr:`MethodSpec.needs_reference`)."""
        return self.spec.needs_reference

    @property
    def average_logps(self) -> bool:
        """Per-token mean (True) or summed (False) sequence log-probs (:attr:`MethodSpec.average_logps`)."""
        return self.spec.average_logps

    @property
    def label_type(self) -> str | None:
        """The labels' kind (:attr:`MethodSpec.label_type`)."""
        return self.spec.label_type

    @property
    def predict_inputs(self) -> str:
        """What ``ulma predict`` feeds :meth:`predict_step` (:attr:`MethodSpec.predict_inputs`)."""
        return self.spec.predict_inputs

    @property
    def tracks_perplexity(self) -> bool:
        """Whether validation/test log the perplexity of demonstrations (a generative policy only)."""
        return self.spec.perplexity and can_generate(getattr(self.policy, "model", None))

    #: The score at or above which a point-wise sample is a positive (a demonstration): 1.0 unless
    #: the module takes a ``positive_threshold`` argument. Perplexity, the generation callback and
    #: the losses all read this one attribute.
    positive_threshold: float = 1.0

    def setup(self, stage: str) -> None:
        """Refuse a data module whose ``predict_inputs`` differ from the declaration's (``ulma`` links
        them; a data module built in Python takes them as a constructor argument)."""
        inputs = getattr(self.data_module, "predict_inputs", None)
        if stage == "predict" and inputs is not None and inputs != self.spec.predict_inputs:
            raise ValueError(
                f"{type(self).__name__} predicts on {self.spec.predict_inputs}, but the data module's predict_inputs is "
                f"{inputs!r}: build it with predict_inputs={self.spec.predict_inputs!r} (ulma links it from the model)"
            )

    # ------------------------------------------------------------ the loss
    def loss(self, *logps: Tensor) -> LossOutput:
        """The objective from per-sequence log-probs: ``(policy_logps, reference_logps, scores)`` for
        point-wise batches, ``(policy_chosen, policy_rejected, reference_chosen, reference_rejected)``
        for pairs, each ``(B,)``. The one method a new method writes."""
        raise NotImplementedError(f"{type(self).__name__} must define loss() (or compute_loss())")

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        """The objective on one batch: log-probs as :attr:`spec` declares them, then :meth:`loss`."""
        average = self.spec.average_logps
        if "chosen_input_ids" in batch:
            both = pair_batch(batch)
            policy_chosen, policy_rejected = self.policy.logps(both, average=average).chunk(2)
            reference_chosen, reference_rejected = self.policy.reference_logps(both, average=average).chunk(2)
            return self.loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
        scores = batch["score"]
        rows = self.spec.reference_rows(scores, stage, self.positive_threshold)
        policy_logps = self.policy.logps(batch, average=average)
        reference_logps = self.policy.reference_logps(batch, average=average, rows=rows)
        out = self.loss(policy_logps, reference_logps, scores)
        if rows is not None:  # the positives' reward is undefined in this stage, whatever the batch holds:
            out.metrics.pop("rewards/positive", None)  # never logged (the same metrics on every process)
        if self.spec.reward_metrics and not bool(reference_logps.isnan().any()):  # some rows only: biased
            self.record_implicit_rewards(policy_logps, reference_logps, scores, stage)
        return out

    def record_implicit_rewards(self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, stage: Stage) -> None:
        """Record the implicit reward ``beta * h + offset`` of a batch for the reward metrics
        (``rewards/accuracy``, ``rewards/auc``; for continuous labels, in validation and test, the
        Pearson and Spearman correlation of ``beta * h`` with the label)."""
        reward = (getattr(self, "beta", 1.0) * (policy_logps - reference_logps)).detach().float()
        probability = torch.sigmoid(reward + getattr(self, "offset", 0.0))
        self.reward_metrics.record(self, probability, scores >= self.positive_threshold, reward, scores, stage)

    # ------------------------------------------------------------ precomputed reference
    def reference_columns(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        """Per-sample values computed once with the reference model in ``precomputed`` mode, keyed by
        :attr:`MethodSpec.precomputed_columns`, each of shape ``(B,)``: ``reference_logps`` of a
        point-wise batch, ``reference_chosen_logps`` and ``reference_rejected_logps`` of pairs."""
        if "chosen_input_ids" in batch:
            chosen, rejected = self.policy.reference_model_logps(pair_batch(batch), average=self.average_logps).chunk(2)
            return {"reference_chosen_logps": chosen, "reference_rejected_logps": rejected}
        return {"reference_logps": self.policy.reference_model_logps(batch, average=self.average_logps)}

    def prepare_precompute(self, split: str) -> None:
        """Called before the reference pass over ``split``, e.g. to attach columns it needs."""

    def precompute_reference_logps(self) -> None:
        """Compute the reference columns of every split now (:func:`~ulma_lightning.modules.reference.precompute_reference_logps`)."""
        precompute_reference_logps(self)

    def _wrapped_by_fsdp(self) -> bool:
        return wrapped_by_fsdp(self)

    def _run_wrapped(self, method: str, *args: Any) -> Any:
        return run_wrapped(self, method, *args)

    # ------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train").loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the step that reaches ``max_steps``, ask Lightning to stop, which also runs validation:
        a run shorter than its validation interval (e.g. 30 steps of a long epoch with
        ``val_check_interval: 0.5``) still ends with validation metrics and a checkpoint to compare."""
        trainer = self.trainer
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self.step_outputs(self._shared_step(batch, "val"), batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        return self.step_outputs(self._shared_step(batch, "test"), batch)

    def on_train_epoch_end(self) -> None:
        if self.spec.reward_metrics:
            self.reward_metrics.log_epoch(self, "train", self.spec.label_type)

    def on_validation_epoch_end(self) -> None:
        if self.spec.reward_metrics:
            self.reward_metrics.log_epoch(self, "val", self.spec.label_type)

    def on_test_epoch_end(self) -> None:
        if self.spec.reward_metrics:
            self.reward_metrics.log_epoch(self, "test", self.spec.label_type)

    def _shared_step(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        if stage == "train" or not self.tracks_perplexity:
            out = self.compute_loss(batch, stage)
        else:
            with self.policy.recording() as records:
                out = self.compute_loss(batch, stage)
            self.update_perplexity(batch, records, stage)
        self.log_step(out, batch, stage)
        return out

    @staticmethod
    def step_outputs(out: LossOutput, batch: dict[str, Tensor]) -> dict[str, Any]:
        """What validation/test steps hand to callbacks: the loss, per-sample rewards and scores."""
        return {"loss": out.loss.detach(), "rewards": out.rewards, "scores": batch.get("score")}

    def update_perplexity(self, batch: dict[str, Tensor], records: list[Any], stage: Stage) -> None:
        """Add the demonstration tokens of ``batch`` to ``{stage}/perplexity``.

        Reuses the policy token log-probs the step computed (``records``) when they cover the
        demonstration rows; otherwise runs one no-gradient forward on those rows.
        """
        found = demonstration_rows(batch, self.positive_threshold)
        if found is None:
            return
        sequences, rows = found
        tokens = reuse_token_logps(records, sequences)
        # the epoch's value is synced across processes: every process logs it, a process with no rows too
        if tokens is None and rows is not None and not bool(rows.any()):
            self.policy.idle_forward(sequences)  # others may run the forward below (a sharded policy)
            values = torch.zeros(0, device=self.device)
        else:
            if tokens is None:
                if rows is not None:
                    sequences, rows = select_rows(sequences, rows), None
                with torch.no_grad():
                    tokens = self.policy.token_logps(sequences)
            values = tokens.values if rows is None else tokens.values[rows[tokens.batch_index]]
        metric = self.eval_perplexity[stage]
        metric.update(values)
        self.log(f"{stage}/perplexity", metric, on_step=False, on_epoch=True)

    def log_step(self, out: LossOutput, batch: dict[str, Tensor], stage: Stage) -> None:
        """Log ``{stage}/loss`` and every metric of the loss, per step (train) and per epoch.

        Epoch means weigh each batch by its size, or, for a metric over a subset of the batch
        (``logps/positive``, ...), by the subset's size (:attr:`LossOutput.counts`): the epoch value
        is the mean over the epoch's samples of that subset (NaN if the epoch had none).

        In validation and test a loss's own ``perplexity`` metric (a per-batch value) gives way to
        the base's token-weighted ``{stage}/perplexity`` over the whole split.
        """
        size = self.batch_size_of(batch)
        on_step = stage == "train"
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss.detach(), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=sync)
        for name, value in out.metrics.items():
            if name == "perplexity" and stage != "train" and self.tracks_perplexity:
                continue
            # a subset metric's epoch mean weighs each batch by the subset's size (a tensor: no sync)
            weight = out.counts.get(name, size)
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=True, batch_size=weight, sync_dist=sync)  # type: ignore[arg-type]

    @staticmethod
    def batch_size_of(batch: dict[str, Tensor]) -> int | None:
        """Samples (rows, or pairs for pairwise batches) in ``batch``."""
        for key in ("input_ids", "chosen_input_ids"):
            if key in batch:
                return int(batch[key].shape[0])
        return None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generated responses for prompt-only batches (``{index, response}``); for batches with
        ``labels`` (a user's own loader of full sequences), per-sample policy log-probs."""
        if "labels" in batch:
            return {"index": batch["index"], "policy_logps": self.policy.logps(batch, average=self.average_logps)}
        responses = generate_responses(
            self.policy.model,
            self.tokenizer,
            batch["input_ids"],
            batch["attention_mask"],
            self.generation,
            seed_offset=batch_idx,
            synced=getattr(self.policy, "lockstep", False),
        )
        return {"index": batch["index"], "response": responses}

    # ------------------------------------------------------------ optimizer
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/grad_norm``: the L2 norm of all gradients, before any clipping."""
        self.log("train/grad_norm", self.gradient_norm(), on_step=True, on_epoch=False, batch_size=1)

    def gradient_norm(self) -> Tensor:
        """The L2 norm of every parameter's gradient; under FSDP and FSDP2, over all shards."""
        squares = [(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).float().square().sum() for p in self.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)
        if self._wrapped_by_fsdp() or self.device_mesh is not None:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")  # disjoint shards: squares add up
        return total.sqrt()

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (no weight decay on biases and norms).

        The fused kernel (one pass over all parameters) is used where torch supports it: ordinary
        float32 tensors on CPU or CUDA; sharded (DTensor) parameters keep the default kernel, and so
        does ``16-mixed`` (loss scaling: gradients are unscaled before clipping, which a fused kernel
        that unscales internally does not allow).
        """
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        scaled = _compat.attached_trainer(self) is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        fused = bool(params) and not scaled and all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        optimizer = self.build_optimizer()
        total = cfg.schedule_steps or max(1, int(self.planned_steps()))
        self._check_resumed_schedule(total)
        self._schedule_steps = total
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_resumed_schedule(self, total: int) -> None:
        """Warn when a resumed run's schedule spans other steps than the checkpointed run's did, after
        the learning rate began to depend on it (the continuation then differs from one whole run)."""
        saved, step = getattr(self, "_resumed_schedule", (None, 0))
        if saved and saved != total and self.optimizer_config.used_span(step):
            warnings.warn(
                f"the checkpoint's learning-rate schedule spanned {saved} steps, this run's spans {total}: its "
                f"{step} steps so far followed the old one, so the run will not equal one uninterrupted run of "
                f"{total} steps. To continue exactly, set model.init_args.optimizer.schedule_steps to the full "
                "length before the first run, or stop runs with max_time instead of max_steps",
                stacklevel=2,
            )

    def planned_steps(self) -> int | float:
        """Optimizer steps of the whole fit, for the schedule, without building the train loader.

        ``trainer.estimated_stepping_batches`` builds the fit loop's train loader when asked before
        the checkpoint is restored, and Lightning then never restores that loader's position
        (Lightning issue #20550): a resumed run would restart its epoch. The count comes from the
        data module's ``train_batches_per_epoch()`` instead, with Lightning's arithmetic.
        """
        trainer = self.trainer
        per_epoch = getattr(self.data_module, "train_batches_per_epoch", None)
        if trainer.max_epochs in (None, -1) or per_epoch is None or _compat.train_loader_built(trainer):
            return trainer.estimated_stepping_batches
        batches = per_epoch()
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------ fit start
    def on_fit_start(self) -> None:
        if self.device.type == "cpu" and "mixed" in str(self.trainer.precision):
            rank_zero_warn(
                f"trainer.precision {self.trainer.precision} on CPU: mixed precision is for GPUs, and autocast on CPU runs many times slower than 32-true here; set --trainer.precision 32-true on CPU"
            )
        schedule_reference_precompute(self)

    # ------------------------------------------------------------ export
    def export_hf(self, path: str | Path, merge_lora: bool = True, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the trained model and its tokenizer as a Hugging Face folder (used by ``HFExport``).

        ``state_dict``: the model's full weights when it is sharded (gathered by ``HFExport``).
        """
        return export_hf(self.policy.model, self.policy.tokenizer, path, merge_lora=merge_lora, state_dict=state_dict)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Frozen reference weights are rebuilt from their source, not stored in checkpoints.

        Under FSDP (torch's FSDP1) they stay: its loader expects every key of the wrapped module.
        The module's class is recorded (``ulma_module_class``) for ``ulma export``. An epoch that fit
        left early (``max_steps``, ``max_time``) is recorded as unfinished, so a resumed run continues
        it (:func:`~ulma_lightning.checkpointing.keep_unfinished_epoch`).
        """
        checkpoint[MODULE_CLASS_KEY] = class_path(type(self))
        if getattr(self, "_schedule_steps", None) is not None:
            checkpoint[SCHEDULE_STEPS_KEY] = self._schedule_steps
        datamodule = self.data_module
        checkpoint[DATA_CLASS_KEY] = class_path(type(datamodule)) if datamodule is not None else None
        keep_unfinished_epoch(checkpoint)
        if self._wrapped_by_fsdp():
            return
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another method's checkpoint; put back the reference weights it does not store."""
        datamodule = self.data_module
        source = str(getattr(_compat.attached_trainer(self), "ckpt_path", None) or "(the checkpoint)")
        check_same_classes(checkpoint, type(self), type(datamodule) if datamodule is not None else None, source)
        if _compat.attached_trainer(self) is not None and _compat.attached_trainer(self).state.fn == "fit":  # resuming: the options must be the checkpoint's
            check_resume_options(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), source)
        self._resumed_schedule = (checkpoint.get(SCHEDULE_STEPS_KEY), int(checkpoint.get("global_step", 0)))
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith(REFERENCE_PREFIX):
                state.setdefault(key, value)
