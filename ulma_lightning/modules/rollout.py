"""The shared part of the RLHF modules: generate rollouts from prompts, score them, take their log-probs,
and run optimisation epochs over them in mini-batches (Lightning manual optimisation).

:class:`RolloutModule` is a sibling of the offline base :class:`~ulma_lightning.modules.base.AlignmentModule`,
not its subclass: it has its own step, and shares the policy, optimizer and schedule, checkpoint and
export pieces with it as the functions of :mod:`~ulma_lightning.modules.shared`."""

from __future__ import annotations

import inspect
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor

import ulma_lightning._compat as _compat
import ulma_lightning.modules.shared as shared
from ulma_lightning.choices import check_choices
from ulma_lightning.data.collate import PaddingCollator
from ulma_lightning.data.contract import ModuleData
from ulma_lightning.data.features import build_sequence
from ulma_lightning.evaluation.generation import GenerationConfig, decode_response, generate_ids
from ulma_lightning.evaluation.scorers import DemoScorer, Scorer, checked_scores
from ulma_lightning.export import export_hf
from ulma_lightning.logprobs import TokenLogps
from ulma_lightning.losses import LossOutput
from ulma_lightning.modules.reference import data_module_of
from ulma_lightning.modules.shared import OptimizerConfig, Stage
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import Policy, PolicyConfig
from ulma_lightning.rl import KLEstimator, to_token_matrix
from ulma_lightning.tokenizers import pad_token_id


@dataclass
class Generations:
    """Responses generated for a batch of prompts (``k`` rows per prompt, consecutive).

    Attributes:
        prompts: the prompt of each row (text or chat messages).
        responses: decoded response text (EOS and what follows removed).
        sequences: right-padded ``input_ids``, ``attention_mask``, ``labels`` (prompt and padding
            labelled ``IGNORE_INDEX``; the response's EOS, when generated, is a labelled token).
        has_eos: whether each response ended with EOS (False: cut at ``max_new_tokens``).
        scores: the scorer's score of each response.
    """

    prompts: list[Any]
    responses: list[str]
    sequences: dict[str, Tensor]
    has_eos: Tensor
    scores: Tensor
    lengths: Tensor
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Rollout(Generations):
    """:class:`Generations` with ``(B, L)`` response-token matrices: ``mask``, the policy's log-probs at
    generation time (``logps``) and the reference's (``reference_logps``; None when the module's
    ``needs_reference`` is False)."""

    mask: Tensor = None  # type: ignore[assignment]
    logps: Tensor = None  # type: ignore[assignment]
    reference_logps: Tensor = None  # type: ignore[assignment]


def run_seed() -> int:
    """The run's seed (``seed_everything``, which Lightning keeps in ``PL_GLOBAL_SEED``), 0 if unset:
    rollouts of runs with different seeds sample different responses."""
    return int(os.environ.get("PL_GLOBAL_SEED") or 0)


#: an RL method's declaration: the reference scores the policy's own generations (never precomputed);
#: no perplexity of demonstrations
ROLLOUT = MethodSpec(perplexity=False, reference_modes=("copy", "adapter"))


class RolloutModule(pl.LightningModule):
    """Base of the online methods (:class:`~ulma_lightning.PPOModule`, :class:`~ulma_lightning.RLOOModule`,
    :class:`~ulma_lightning.GRPOModule`, :class:`~ulma_lightning.OnlineULMAModule`); a sibling of the
    offline :class:`~ulma_lightning.AlignmentModule`, sharing its policy, optimizer and schedule,
    checkpoint and export pieces (:mod:`~ulma_lightning.modules.shared`), not its step. A method
    implements :meth:`update`.

    Each training step takes a batch of left-padded prompts (:class:`~ulma_lightning.PromptDataModule`),
    generates ``samples_per_prompt`` responses per prompt with the KV cache, scores them with
    ``scorer``, computes the policy's and the reference's token log-probs on them (chunked, no
    ``(B x T x vocab)`` tensor), and hands the :class:`Rollout` to :meth:`update`. Validation and test
    generate greedily and log ``{stage}/reward`` (the mean score), ``{stage}/response_length`` and
    ``{stage}/no_eos_fraction``.

    Rollouts are sampled with ``generation.seed`` plus the step, the process rank and the run seed
    (``seed_everything``): runs with different seeds draw different responses.

    Reference modes: ``copy`` and ``adapter`` (the reference scores the policy's own generations, so it
    cannot be precomputed). DDP and FSDP2 (``configs/strategy/fsdp2.yaml``) work. Under FSDP2 the
    policy and a ``copy`` reference are sharded per block (:func:`~ulma_lightning.sharding.shard_policy`)
    and every process decodes in lockstep (transformers' ``synced_gpus``: a process whose responses
    have all ended keeps running forwards until every process is done); the scorer is not sharded
    (each process holds its own copy and scores its own responses). torch's FSDP1 is refused, and so is
    a subclass with :attr:`runs_under_fsdp2` False (PPO: its critic is not sharded).

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule (one scheduler step per rollout batch).
        scorer: the reward: any scorer of :mod:`ulma_lightning.evaluation.scorers` by ``class_path``
            (``RewardModelScorer`` for a reward-model checkpoint, ``HFClassifierScorer`` for an exported
            or hub reward model, ``DemoScorer`` for the demo task's ground truth, the default). Reward
            models re-tokenize the text with their own tokenizer. A built-in task's ground truth
            (``DemoScorer``, ``TaskScorer``) on other data is an error (:meth:`check_scorer`).
        generation: rollout sampling settings (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``).
        samples_per_prompt: responses generated per prompt.
        kl_coef: the KL penalty's coefficient ``beta``.
        kl_estimator: ``k1`` (``log pi - log pi_ref``) or ``k3`` (``(r - 1) - log r``, ``r = pi_ref / pi``).
        missing_eos_penalty: subtracted from the score of a response cut at ``max_new_tokens`` without
            EOS (TRL's ``missing_eos_penalty``); null: no penalty.
        reward_clip: clip scores to ``[-reward_clip, reward_clip]``; null: no clipping.
        max_grad_norm: clip the gradient norm of every optimiser step to this (null: no clipping).
        eval_generation: decoding of validation and test generations, logged as ``{stage}/reward``
            (default: greedy, with the rollouts' ``max_new_tokens``). Sampling here measures the
            expected score, which RL raises before the greedy answer changes.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        scorer: Scorer | None = None,
        generation: GenerationConfig | None = None,
        samples_per_prompt: int = 1,
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        max_grad_norm: float | None = 1.0,
        eval_generation: GenerationConfig | None = None,
        _spec: MethodSpec = ROLLOUT,
    ) -> None:
        super().__init__()
        shared.save_hyperparameters(self, inspect.currentframe())
        self.spec = shared.method_spec(self, _spec, policy)
        self.policy = Policy(policy)
        self.optimizer_config = optimizer or OptimizerConfig()
        check_choices(kl_estimator=(kl_estimator, get_args(KLEstimator)))
        check_numbers(samples_per_prompt=(samples_per_prompt, ">= 1"), kl_coef=(kl_coef, ">= 0"))
        self.automatic_optimization = False
        self.scorer = scorer if scorer is not None else DemoScorer()
        self.rollout_generation = generation or GenerationConfig(max_new_tokens=32, do_sample=True)
        self.generation = eval_generation or GenerationConfig(max_new_tokens=self.rollout_generation.max_new_tokens)
        self.samples_per_prompt = samples_per_prompt
        self.kl_estimator = kl_estimator
        self.missing_eos_penalty = missing_eos_penalty
        self.reward_clip = reward_clip
        self.max_grad_norm = max_grad_norm
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))  # a buffer: the adaptive value is checkpointed

    #: the method's declaration (a subclass whose needs depend on its options passes ``_spec`` instead)
    spec: MethodSpec = ROLLOUT

    #: Whether the module trains under FSDP2: every trainable weight lives in the policy, which
    #: ``configure_model`` shards. A subclass with another trained model that is not sharded sets False.
    runs_under_fsdp2: bool = True

    @property
    def tokenizer(self) -> Any:
        return self.policy.tokenizer

    @property
    def data_module(self) -> ModuleData | None:
        """The trainer's data module, through what modules may use of it (:class:`ModuleData`); None
        without a trainer or a data module."""
        return data_module_of(self)

    needs_reference = shared.spec_view("needs_reference")
    average_logps = shared.spec_view("average_logps")
    label_type = shared.spec_view("label_type")
    predict_inputs = shared.spec_view("predict_inputs")

    def configure_model(self) -> None:
        """Build the policy (and the reference it needs); under FSDP2 shard them per block
        (:func:`~ulma_lightning.modules.shared.configure_policy`)."""
        shared.configure_policy(self)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = getattr(_compat.attached_trainer(self), "strategy", None)
        name = type(self).__name__
        if isinstance(strategy, FSDPStrategy):
            raise NotImplementedError(
                f"{name} does not run under {type(strategy).__name__} (torch FSDP1, configs/strategy/fsdp.yaml): "
                "rollouts are generated in lockstep only under FSDP2. Use --config configs/strategy/fsdp2.yaml, or "
                "DDP (--config configs/strategy/ddp.yaml)"
            )
        if isinstance(strategy, ModelParallelStrategy) and not self.runs_under_fsdp2:
            raise NotImplementedError(
                f"{name} does not run under {type(strategy).__name__} (FSDP2, configs/strategy/fsdp2.yaml): it trains "
                "a model besides the policy (a critic) that is not sharded, so its gradients would not be "
                "synchronised. Use DDP (--config configs/strategy/ddp.yaml), or one device, with LoRA (policy.lora) "
                "to fit a larger model; RLOOModule, GRPOModule and OnlineULMAModule run under FSDP2"
            )
        if stage in ("fit", "validate", "test"):
            self.check_scorer(stage)

    def check_scorer(self, stage: str) -> None:
        """Stop when the reward is a built-in task's ground truth (``DemoScorer``, ``TaskScorer``) and the
        data is not that task's: the shipped configs' default reward must never score your own prompts
        silently. Checks the training data for ``fit`` and the data of the evaluated split for
        ``validate`` and ``test`` (the rule of :meth:`Scorer.applies_to`)."""
        datamodule = self.data_module
        if datamodule is None or not hasattr(datamodule, "source_of"):
            return
        train = datamodule.source_of("train")
        split = {"fit": "train", "validate": "val"}.get(stage, stage)
        sources = [train] if split == "train" else [train, datamodule.source_of(split)]
        if self.scorer.applies_to(sources):
            return
        raise ValueError(
            f"{type(self).__name__}: the reward, model.init_args.scorer, is {type(self.scorer).__name__} (the ground "
            "truth of "
            f"a built-in task) but data.{split} is {sources[-1]!r}, not that task's data: it would reward nothing "
            "meaningful. Set the scorer to your reward model: --model.init_args.scorer "
            "'{class_path: ulma_lightning.evaluation.HFClassifierScorer, init_args: {path: PATH}}' (an exported reward "
            "model folder), or ulma_lightning.evaluation.RewardModelScorer with init_args.ckpt_path (a reward-model "
            "checkpoint)"
        )

    def on_fit_start(self) -> None:
        self.scorer.to(self.device)

    def on_test_start(self) -> None:
        self.scorer.to(self.device)

    # ------------------------------------------------------------ rollouts
    def generate_and_score(
        self, batch: dict[str, Any], config: GenerationConfig, k: int = 1, *, seed_offset: int = 0
    ) -> Generations:
        """Generate ``k`` responses per prompt of a left-padded prompt batch and score them (when
        sampling, the sampler is seeded with ``config.seed + seed_offset``)."""
        tok = self.tokenizer
        ids, attention = batch["input_ids"], batch["attention_mask"]
        prompts = [p for p in batch["prompt"] for _ in range(k)]
        if k > 1:
            ids, attention = ids.repeat_interleave(k, 0), attention.repeat_interleave(k, 0)
        start = time.perf_counter()
        synced = self.policy.lockstep  # sharded: every process runs every decoding step
        new_ids = generate_ids(
            self.policy.model, tok, ids, attention, config, seed_offset=seed_offset, synced=synced
        ).tolist()
        generated = time.perf_counter() - start
        eos = tok.eos_token_id
        items, responses, has_eos = [], [], []
        for row, new in enumerate(new_ids):
            ended = eos in new
            response = new[: new.index(eos) + 1] if ended else new
            prompt = ids[row][attention[row].bool()].tolist()
            input_ids, labels = build_sequence(prompt, response)
            items.append({"input_ids": input_ids, "labels": labels})
            responses.append(decode_response(tok, response))
            has_eos.append(ended)
        sequences = {k_: v.to(self.device) for k_, v in PaddingCollator(pad_token_id(tok))(items).items()}
        start = time.perf_counter()
        scores = checked_scores(self.scorer, prompts, responses).to(self.device)
        scored = time.perf_counter() - start
        lengths = torch.as_tensor(
            [len(item["labels"]) - int((item["labels"] < 0).sum()) for item in items], device=self.device
        )
        return Generations(
            prompts,
            responses,
            sequences,
            torch.as_tensor(has_eos, device=self.device),
            scores,
            lengths,
            {"generate": generated, "score": scored},
        )

    def token_matrix(self, tokens: TokenLogps, width: int | None = None) -> tuple[Tensor, Tensor]:
        """``(B, L)`` matrix and mask of per-token values in :class:`TokenLogps` order."""
        return to_token_matrix(tokens.values, tokens.batch_index, tokens.num_sequences, width)

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Generate (sampling), score, and compute the policy's and the reference's token log-probs."""
        # new samples every step, different per process and per run seed (seed_everything)
        seed = int(self.global_step) + 7919 * self.global_rank + 1_000_003 * run_seed()
        gen = self.generate_and_score(batch, self.rollout_generation, self.samples_per_prompt, seed_offset=seed)
        with torch.no_grad():
            start = time.perf_counter()
            logps, mask = self.token_matrix(self.policy.token_logps(gen.sequences))
            gen.timings["logprobs"] = time.perf_counter() - start
            reference = None
            if self.needs_reference:  # GRPO with beta 0 runs no reference
                start = time.perf_counter()
                reference, _ = self.token_matrix(self.policy.token_logps(gen.sequences, reference=True), logps.shape[1])
                gen.timings["reference"] = time.perf_counter() - start
        return Rollout(**vars(gen), mask=mask, logps=logps, reference_logps=reference)

    def final_scores(self, rollout: Rollout) -> Tensor:
        """Scores after the missing-EOS penalty and clipping (the reward before the KL penalty)."""
        scores = rollout.scores
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~rollout.has_eos).to(scores.dtype)
        if self.reward_clip is not None:
            scores = scores.clamp(-self.reward_clip, self.reward_clip)
        return scores

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        """AdamW with the warm-up and decay of ``optimizer`` (:mod:`~ulma_lightning.modules.shared`); the
        scheduler steps once per rollout batch (:meth:`training_step`)."""
        return shared.with_schedule(self, shared.build_optimizer(self, self.optimizer_config), self.optimizer_config)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/grad_norm``: the L2 norm of all gradients, before any clipping."""
        self.log("train/grad_norm", shared.gradient_norm(self), on_step=True, on_epoch=False, batch_size=1)

    def update(self, rollout: Rollout) -> dict[str, Tensor | float]:
        """Optimise on one rollout batch; returns metrics to log under ``train/``."""
        raise NotImplementedError

    def minibatch_updates(
        self, size: int, epochs: int, mini_batch_size: int | None, step: Callable[[Tensor], LossOutput]
    ) -> dict[str, float]:
        """``epochs`` passes over ``size`` rows in shuffled mini-batches, one optimiser step each;
        ``step(rows)`` returns the loss of those rows. Returns the mean of each metric and of the loss."""
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(
            int(self.global_step) + 104729 * self.global_rank + 1_000_003 * run_seed()
        )
        per_step = mini_batch_size or size
        collected: dict[str, list[float]] = defaultdict(list)
        for _ in range(epochs):
            order = torch.randperm(size, generator=generator).to(self.device)
            for start in range(0, size, per_step):
                out = step(order[start : start + per_step])
                optimizer.zero_grad()
                self.manual_backward(out.loss)
                if self.max_grad_norm is not None:
                    self.clip_grad_norm(optimizer, self.max_grad_norm)
                optimizer.step()
                collected["loss"].append(float(out.loss.detach()))
                for name, value in out.metrics.items():
                    collected[name].append(float(value))
        return {name: sum(values) / len(values) for name, values in collected.items()}

    def clip_grad_norm(self, optimizer: Any, max_norm: float) -> None:
        """Clip the gradients' global L2 norm to ``max_norm``. Without loss scaling (``32-true``,
        ``bf16-mixed``) the gradients are the true ones and are clipped directly (Lightning's
        ``clip_gradients`` refuses the fused AdamW under any mixed precision); with ``16-mixed``
        Lightning unscales them first (the optimizer is then not fused)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        start = time.perf_counter()
        metrics = self.update(rollout)
        rollout.timings["update"] = time.perf_counter() - start
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        self.log_rollout(rollout, metrics)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop at ``max_steps``, with validation (:func:`~ulma_lightning.modules.shared.stop_at_max_steps`)."""
        shared.stop_at_max_steps(self.trainer)

    def log_rollout(self, rollout: Rollout, metrics: dict[str, Tensor | float]) -> None:
        """Log the update's metrics and the rollout's: reward, entropy, lengths, EOS share, speed, time split."""
        size = len(rollout.responses)
        generated = float(rollout.lengths.sum())
        values: dict[str, Tensor | float] = {
            "reward": rollout.scores.mean(),
            "entropy": -(rollout.logps * rollout.mask).sum() / rollout.mask.sum().clamp(min=1),
            "response_length": rollout.lengths.float().mean(),
            "no_eos_fraction": (~rollout.has_eos).float().mean(),
            "kl_coef": self.kl_coef,
            "generation/tokens_per_sec": generated / max(rollout.timings["generate"], 1e-9),
            **{f"time/{name}": seconds for name, seconds in rollout.timings.items()},
            **metrics,
        }
        for name, value in values.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=size, prog_bar=name == "reward")

    # ------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluate_batch(batch, batch_idx, "test")

    def evaluate_batch(self, batch: dict[str, Any], batch_idx: int, stage: Stage) -> dict[str, Any]:
        """Greedy generations for held-out prompts, scored: ``{stage}/reward`` and friends."""
        gen = self.generate_and_score(
            batch, self.generation, seed_offset=batch_idx
        )  # same samples for the same weights
        size = len(gen.responses)
        for name, value in (
            ("reward", gen.scores.mean()),
            ("response_length", gen.lengths.float().mean()),
            ("no_eos_fraction", (~gen.has_eos).float().mean()),
        ):
            self.log(
                f"{stage}/{name}", value, on_epoch=True, batch_size=size, sync_dist=True, prog_bar=name == "reward"
            )
        return {"scores": gen.scores}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``ulma predict``: responses to prompt-only batches, with the settings in :attr:`generation`
        (:func:`~ulma_lightning.modules.shared.predict`)."""
        return shared.predict(self, batch, batch_idx)

    # ------------------------------------------------------------ export and checkpoints
    def export_hf(self, path: str | Path, merge_lora: bool = True, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the policy and its tokenizer as a Hugging Face folder (used by ``HFExport``); a
        critic or a reference is not exported. ``state_dict``: the full weights of a sharded policy."""
        return export_hf(self.policy.model, self.policy.tokenizer, path, merge_lora=merge_lora, state_dict=state_dict)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Frozen reference weights are rebuilt from their source, not stored; the module's and data's
        classes and the schedule's span are recorded (:func:`~ulma_lightning.modules.shared.save_checkpoint`)."""
        shared.save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another method's checkpoint; put back the reference weights it does not store
        (:func:`~ulma_lightning.modules.shared.load_checkpoint`)."""
        shared.load_checkpoint(self, checkpoint)
