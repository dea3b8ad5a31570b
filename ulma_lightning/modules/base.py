"""The offline methods' base, :class:`AlignmentModule`: a method is a declaration
(:class:`~ulma_lightning.modules.spec.MethodSpec`) and a loss; this file holds the step that turns a
batch into log-probs for that loss, logging and perplexity. The pieces it shares with its sibling
:class:`~ulma_lightning.modules.rollout.RolloutModule` (policy build, optimizer and schedule, export,
checkpoints) are functions in :mod:`~ulma_lightning.modules.shared`; precomputed references and FSDP
routing are functions in :mod:`~ulma_lightning.modules.reference`, the reward metrics an object of
:mod:`~ulma_lightning.modules.implicit_rewards`."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

import ulma_lightning.modules.shared as shared
from ulma_lightning.data.contract import ModuleData
from ulma_lightning.evaluation.generation import GenerationConfig, can_generate
from ulma_lightning.evaluation.metrics import TokenPerplexity, demonstration_rows, reuse_token_logps
from ulma_lightning.export import export_hf
from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.batching import pair_batch
from ulma_lightning.modules.implicit_rewards import RewardMetrics
from ulma_lightning.modules.reference import (
    data_module_of,
    precompute_reference_logps,
    run_wrapped,
    schedule_reference_precompute,
    wrapped_by_fsdp,
)
from ulma_lightning.modules.shared import OPTION_FIELDS, REFERENCE_PREFIX, SCHEDULE_STEPS_KEY, OptimizerConfig, Stage
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.policy import Policy, PolicyConfig, PretrainedModel, select_rows

__all__ = ["OPTION_FIELDS", "REFERENCE_PREFIX", "SCHEDULE_STEPS_KEY", "AlignmentModule", "OptimizerConfig", "Stage"]

# The frozen reference model is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class AlignmentModule(pl.LightningModule):
    """Base of every offline method (a sibling of :class:`~ulma_lightning.modules.rollout.RolloutModule`,
    not its parent: the two share their policy, optimizer, checkpoint and export pieces as the functions
    of :mod:`~ulma_lightning.modules.shared`): a method passes its declaration (:class:`MethodSpec`) to this
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
            :attr:`spec`); private: not a config option. Constructor options named ``average_logps`` or ``label_type``
            (not None) set those fields: an option is declared once, as a typed argument.
    """

    #: the method's declaration; a method whose needs depend on its options passes ``_spec`` instead
    spec: MethodSpec = MethodSpec()

    def __init__(
        self, policy: PolicyConfig, optimizer: OptimizerConfig | None = None, _spec: MethodSpec | None = None
    ) -> None:
        super().__init__()
        shared.save_hyperparameters(self, inspect.currentframe())
        self.spec = shared.method_spec(self, _spec or type(self).spec, policy)
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
        """Build the policy (and the reference it needs), check ``data.max_length``; under FSDP2
        shard them per block (:func:`~ulma_lightning.modules.shared.configure_policy`)."""
        shared.configure_policy(self)

    def check_max_length(self) -> None:
        """Refuse a ``data.max_length`` the model has no positions for
        (:func:`~ulma_lightning.modules.shared.check_max_length`)."""
        shared.check_max_length(self)

    # ------------------------------------------------------------ the declaration
    @property
    def data_module(self) -> ModuleData | None:
        """The trainer's data module, through what modules may use of it (:class:`ModuleData`); None
        without a trainer or a data module."""
        return data_module_of(self)

    needs_reference = shared.spec_view("needs_reference")
    average_logps = shared.spec_view("average_logps")
    label_type = shared.spec_view("label_type")
    predict_inputs = shared.spec_view("predict_inputs")

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
                f"{type(self).__name__} predicts on {self.spec.predict_inputs}, but the data module's predict_inputs "
                f"is {inputs!r}: build it with predict_inputs={self.spec.predict_inputs!r} (ulma links it from the "
                "model)"
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

    def record_implicit_rewards(
        self, policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, stage: Stage
    ) -> None:
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
        """Compute the reference columns of every split now
        (:func:`~ulma_lightning.modules.reference.precompute_reference_logps`)."""
        precompute_reference_logps(self)

    def _wrapped_by_fsdp(self) -> bool:
        return wrapped_by_fsdp(self)

    def _run_wrapped(self, method: str, *args: Any) -> Any:
        return run_wrapped(self, method, *args)

    # ------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train").loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at ``max_steps``, with validation (:func:`~ulma_lightning.modules.shared.stop_at_max_steps`)."""
        shared.stop_at_max_steps(self.trainer)

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
        self.log(
            f"{stage}/loss",
            out.loss.detach(),
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            batch_size=size,
            sync_dist=sync,
        )
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
        ``labels`` (a user's own loader of full sequences), per-sample policy log-probs
        (:func:`~ulma_lightning.modules.shared.predict`)."""
        return shared.predict(self, batch, batch_idx)

    # ------------------------------------------------------------ optimizer
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/grad_norm``: the L2 norm of all gradients, before any clipping."""
        self.log("train/grad_norm", self.gradient_norm(), on_step=True, on_epoch=False, batch_size=1)

    def gradient_norm(self) -> Tensor:
        """The L2 norm of every parameter's gradient; under FSDP and FSDP2, over all shards."""
        return shared.gradient_norm(self)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (:func:`~ulma_lightning.modules.shared.build_optimizer`)."""
        return shared.build_optimizer(self, self.optimizer_config)

    def configure_optimizers(self) -> Any:
        return shared.with_schedule(self, self.build_optimizer(), self.optimizer_config)

    def planned_steps(self) -> int | float:
        """Optimizer steps of the whole fit, for the schedule (:func:`~ulma_lightning.modules.shared.planned_steps`)."""
        return shared.planned_steps(self)

    # ------------------------------------------------------------ fit start
    def on_fit_start(self) -> None:
        if self.device.type == "cpu" and "mixed" in str(self.trainer.precision):
            rank_zero_warn(
                f"trainer.precision {self.trainer.precision} on CPU: mixed precision is for GPUs, and autocast on CPU "
                "runs many times slower than 32-true here; set --trainer.precision 32-true on CPU"
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
        """Frozen reference weights are rebuilt from their source, not stored in checkpoints; the
        module's and data's classes and the schedule's span are recorded
        (:func:`~ulma_lightning.modules.shared.save_checkpoint`)."""
        shared.save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another method's checkpoint; put back the reference weights it does not store
        (:func:`~ulma_lightning.modules.shared.load_checkpoint`)."""
        shared.load_checkpoint(self, checkpoint)
