"""Reward model: a scalar-head sequence classifier trained on pairs (Bradley-Terry) or point-wise scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ulma_lightning.data.features import scoring_batches
from ulma_lightning.losses import LossOutput, RewardForm, bradley_terry_loss, pointwise_reward_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.modules.batching import pair_batch
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.policy import PolicyConfig, PretrainedModel
from ulma_lightning.tokenizers import pad_token_id


class RewardModel(PretrainedModel):
    """``AutoModelForSequenceClassification`` with ``num_labels: 1`` and its tokenizer: the policy's
    sibling (both are :class:`~ulma_lightning.policy.PretrainedModel`), with scores instead of
    log-probs and no reference.

    Built like the policy from a :class:`PolicyConfig` (``model`` hub id or folder, or a random init
    from ``model_config``; ``dtype``, ``lora``, ``gradient_checkpointing``, ...). Loading a causal-LM
    checkpoint gives it a freshly initialised scalar head. The reward of a sequence is the head's
    output at its last non-pad token (the Hugging Face pooling, so an exported folder scores the
    same way elsewhere); batches must therefore be padded with the tokenizer's pad id.
    """

    auto_class = "AutoModelForSequenceClassification"
    model_kwargs = {"num_labels": 1}
    lora_task_type = "SEQ_CLS"

    def build(self, *, empty: bool = False) -> None:
        """Build as :meth:`PretrainedModel.build` does (``empty``: a meta-device skeleton for ``ulma export``),
        and give the config the tokenizer's pad id, which the classifier's pooling needs."""
        super().build(empty=empty)
        config = self.model.config  # type: ignore[union-attr]
        if config.pad_token_id is None:
            config.pad_token_id = self.pad_token_id

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def rewards(self, batch: dict[str, Tensor]) -> Tensor:
        """The scalar reward of each row, float32, shape ``(B,)``."""
        if self.model is None:
            raise RuntimeError("RewardModel.build() has not run: call it (or the module's configure_model) first")
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        return logits.squeeze(-1).float()


class RewardModelModule(AlignmentModule):
    """Trains a reward model: Bradley-Terry on pairs, or BCE/MSE on point-wise scores.

    The data decides the objective: :class:`~ulma_lightning.PairwiseDataModule` batches get
    ``-log sigma(r_chosen - r_rejected)`` (both sides in one forward pass);
    :class:`~ulma_lightning.PointwiseDataModule` batches get ``pointwise_form``. Logs ``rewards/accuracy``
    (pairs ranked right, or samples on the right side of the decision point) and the mean rewards.
    ``HFExport`` writes the scoring model as a Hugging Face folder
    (``AutoModelForSequenceClassification.from_pretrained`` loads it); :meth:`score` rates new
    (prompt, response) pairs with the same formatting as the training data.

    Args:
        policy: the settings of the scoring model and its tokenizer (:class:`PolicyConfig`, the same
            settings a policy takes; ``reference`` is not used); the model is :attr:`reward_model`.
        optimizer: optimizer and learning-rate schedule.
        pointwise_form: for point-wise scores, ``bce`` (the reward is a logit of the score) or
            ``mse`` (the reward regresses the score).
        positive_threshold: a score at or above it counts as positive for the point-wise accuracy.
        max_length: tokens per sequence kept by :meth:`score` (the end of long prompts is kept).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        pointwise_form: RewardForm = "bce",
        positive_threshold: float = 1.0,
        max_length: int = 1024,
    ) -> None:
        super().__init__(policy, optimizer)
        self.pointwise_form = pointwise_form
        self.positive_threshold = positive_threshold
        self.max_length = max_length

    @property
    def reward_model(self) -> RewardModel:
        """The reward model being trained. It sits in the base's slot for the trained model,
        ``policy`` (so checkpoints keep the keys ``policy.model.*`` and ``ulma export`` reads them
        as for every method); ``policy`` is the same object, kept as an alias."""
        return self.policy  # type: ignore[return-value]

    #: no reference; ``ulma predict`` scores the split's full samples (it does not generate)
    spec = MethodSpec(reference="none", predict_inputs="sequences")

    def build_policy(self, config: PolicyConfig) -> RewardModel:
        return RewardModel(config)

    def rewards(self, batch: dict[str, Tensor]) -> Tensor:
        """Rewards of the rows of a point-wise batch, or of the chosen then rejected rows of a pair batch."""
        if "chosen_input_ids" in batch:
            batch = pair_batch(batch, pad_token_id=self.reward_model.pad_token_id)
        return self.reward_model.rewards(batch)

    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        if "chosen_input_ids" in batch:
            chosen, rejected = self.rewards(batch).chunk(2)
            return bradley_terry_loss(chosen, rejected)
        if "score" in batch:
            return pointwise_reward_loss(
                self.rewards(batch),
                batch["score"],
                form=self.pointwise_form,
                positive_threshold=self.positive_threshold,
            )
        raise ValueError(
            "the reward model trains on pairs (PairwiseDataModule) or scored samples (PointwiseDataModule); this batch "
            "has neither"
        )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Rewards per sample (``rewards``), or per side of each pair (``chosen_rewards``, ``rejected_rewards``)."""
        rewards = self.rewards(batch)
        if "chosen_input_ids" in batch:
            chosen, rejected = rewards.chunk(2)
            return {"index": batch["index"], "chosen_rewards": chosen, "rejected_rewards": rejected}
        return {"index": batch["index"], "rewards": rewards}

    @torch.no_grad()
    def score(self, prompts: list[Any], responses: list[str], batch_size: int = 16) -> Tensor:
        """Rewards of ``responses`` to ``prompts`` (strings, HH text or chat message lists), shape ``(N,)``.

        Formats and tokenizes exactly as the data modules do (chat template or HH text, EOS after the
        response, truncation to ``max_length`` keeping the end of the prompt). Returns float32 on CPU.
        """
        if len(prompts) != len(responses):
            raise ValueError(
                f"score() needs one response per prompt, got {len(prompts)} prompts and {len(responses)} responses"
            )
        if self.reward_model.model is None:
            self.configure_model()
        model = self.reward_model.model
        assert model is not None  # configure_model built it
        was_training = model.training
        model.eval()
        out = []
        try:
            for batch in scoring_batches(self.reward_model.tokenizer, prompts, responses, self.max_length, batch_size):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out.append(self.reward_model.rewards(batch).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)
