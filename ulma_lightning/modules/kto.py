"""KTO on point-wise binary feedback, with the KL baseline from mismatched (prompt, response) pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from ulma_lightning.data.features import Truncation
from ulma_lightning.losses import LossOutput, kto_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.modules.batching import SEQUENCE_KEYS, roll_rows, stack_batches, swap_responses
from ulma_lightning.policy import PolicyConfig


class KTOModule(AlignmentModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on :class:`~ulma_lightning.PointwiseDataModule` data.

    A sample is desirable when ``score >= positive_threshold``. The reference point
    ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` is estimated on *mismatched* pairs
    ``(x, y')`` and is detached; see :func:`~ulma_lightning.losses.kto_loss`.

    Mismatched pairs. With a ``copy`` or ``adapter`` reference, row ``i`` of a batch is paired with
    the response of row ``i - 1`` of the *same* batch (cyclically), built in the step, so any order
    of the data works (shuffled, length-grouped). The reference runs on the matched and mismatched
    rows in one forward pass; the policy runs on the mismatched rows without gradient (``z0`` is
    detached, so a backward through them would only add zeros). The estimate is the mean over the mismatched pairs of *all* processes (a sum and a count
    are all-reduced), so every rank uses the same ``z0``; a step with no mismatched pair anywhere (a
    batch of one sample) reuses the previous estimate.

    With ``reference: precomputed`` the reference cannot run during training, so the mismatched
    pairs are fixed per sample before training: each split gets a seeded cyclic permutation
    ``kl_partner`` (sample ``i`` is paired with the response of sample ``kl_partner[i]``, never
    itself when the split has 2 or more samples), and the reference log-probs of those pairs are
    precomputed and stored as ``reference_kl_logps`` beside ``reference_logps``. During training the
    policy runs on the same fixed pairs (the partner's tokens are read from the data module), so
    ``z0`` is still a mean over one mismatched pair per sample of the batch, averaged across
    processes, and it works with shuffled data. A split without precomputed values (e.g. ``ulma test``
    in a fresh process, where the reference is rebuilt) falls back to in-batch pairs and the live
    reference.

    Args:
        policy: the model, tokenizer and reference settings.
        optimizer: optimizer and learning-rate schedule.
        beta: the KL-regularisation strength.
        desirable_weight: weight of desirable samples' losses (lambda_D).
        undesirable_weight: weight of undesirable samples' losses (lambda_U).
        positive_threshold: a score at or above it marks a desirable sample.
        average_logps: per-token mean (True) or summed (False, the paper and TRL) log-probs.
        kl_seed: seed of the fixed partner permutation in ``precomputed`` mode.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        positive_threshold: float = 1.0,
        average_logps: bool = False,
        kl_seed: int = 0,
    ) -> None:
        super().__init__(policy, optimizer)
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.positive_threshold = positive_threshold
        self.kl_seed = kl_seed
        self.kl = torch.zeros(())  # the last global KL estimate (detached)
        self.kl_local = torch.zeros(())  # this process's mean over its mismatched pairs, for inspection

    # ------------------------------------------------------------ mismatched pairs
    def partner_batch(self, partners: Tensor, split: str) -> dict[str, Tensor]:
        """The samples ``partners`` of a split, collated (precomputed mode: fixed partners)."""
        datamodule = self.trainer.datamodule
        dataset = datamodule.datasets[split]
        batch = datamodule.collator([dataset.items[j] for j in partners.long().tolist()])
        return {key: batch[key].to(self.device) for key in SEQUENCE_KEYS}

    @property
    def truncation(self) -> Truncation | None:
        """The data module's truncation, applied to the mismatched pairs too (None without one)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "truncation", None)

    def kl_batch(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor] | None:
        """Mismatched pairs for ``batch``: prompt of row ``i``, response of its partner; None if none.

        The partner is the fixed ``kl_partner`` where the batch carries precomputed columns, else the
        previous row of the batch.
        """
        if "kl_partner" in batch:
            return swap_responses(batch, self.partner_batch(batch["kl_partner"], split), self.truncation)
        if batch["input_ids"].shape[0] < 2:
            return None
        return swap_responses(batch, roll_rows(batch, 1), self.truncation)

    def global_kl(self, differences: Tensor) -> Tensor:
        """Mean of ``log pi - log pi_ref`` over the mismatched pairs of every process, detached."""
        stats = torch.stack([differences.detach().sum(), torch.tensor(float(differences.numel()), device=differences.device)])
        if stats[1] > 0:
            self.kl_local = (stats[0] / stats[1]).cpu()
        if self._trainer is not None:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[1] > 0:
            self.kl = (stats[0] / stats[1]).detach()
        return self.kl.to(differences.device)

    # ------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        size = batch["input_ids"].shape[0]
        kl_batch = self.kl_batch(batch, stage)
        inputs = batch if kl_batch is None else stack_batches(batch, kl_batch)
        policy_logps = self.policy.logps(batch, average=self.average_logps)
        kl_policy = policy_logps[:0]
        if kl_batch is not None:
            with torch.no_grad():  # z0 is detached: no backward through the mismatched pairs
                kl_policy = self.policy.logps(kl_batch, average=self.average_logps)
        if "kl_partner" in batch:  # precomputed values
            reference_logps = batch["reference_logps"].float()
            kl_reference = batch["reference_kl_logps"].float()
        else:  # the reference runs now (in precomputed mode: a split that was not precomputed, if still loaded)
            reference_all = self.policy.reference_logps(inputs, average=self.average_logps)
            reference_logps, kl_reference = reference_all[:size], reference_all[size:]
        kl = self.global_kl(kl_policy - kl_reference[: kl_policy.shape[0]])
        return kto_loss(
            policy_logps,
            reference_logps,
            batch["score"] >= self.positive_threshold,
            kl.reshape(1),
            torch.zeros_like(kl).reshape(1),
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )

    # ------------------------------------------------------------ precomputed reference
    @property
    def precomputed_columns(self) -> tuple[str, ...]:
        return ("reference_logps", "reference_kl_logps")

    def prepare_precompute(self, split: str) -> None:
        """Fix each sample's KL partner: a seeded cyclic permutation (identical on every process)."""
        datamodule = self.trainer.datamodule
        if datamodule.has_column(split, "kl_partner"):
            return
        size = len(datamodule.datasets[split])
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.kl_seed))
        partner = torch.empty(size, dtype=torch.long)
        partner[order] = order.roll(1)
        datamodule.set_column(split, "kl_partner", partner)

    def reference_columns(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        size = batch["input_ids"].shape[0]
        inputs = stack_batches(batch, swap_responses(batch, self.partner_batch(batch["kl_partner"], split), self.truncation))
        values = self.policy.token_logps(inputs, reference=True).per_sequence(self.average_logps)
        return {"reference_logps": values[:size], "reference_kl_logps": values[size:]}
