"""KTO on point-wise binary feedback, with the KL baseline from mismatched (prompt, response) pairs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import ulma_lightning._compat as _compat
from ulma_lightning.data.features import Truncation
from ulma_lightning.losses import LossOutput, kto_loss
from ulma_lightning.modules.base import AlignmentModule, OptimizerConfig, Stage
from ulma_lightning.modules.batching import (
    SEQUENCE_KEYS,
    mismatched_partners,
    prompt_groups,
    stack_batches,
    swap_responses,
)
from ulma_lightning.modules.spec import MethodSpec
from ulma_lightning.options import check_numbers
from ulma_lightning.policy import PolicyConfig, select_rows

KL_KEY = "kto_kl_estimate"  # the checkpoint entry of the last KL estimate


class KTOModule(AlignmentModule):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on :class:`~ulma_lightning.PointwiseDataModule` data.

    A sample is desirable when ``score >= positive_threshold``. The reference point
    ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` is estimated on *mismatched* pairs
    ``(x, y')`` and is detached; see :func:`~ulma_lightning.losses.kto_loss`.

    Mismatched pairs. A row's partner never answers the same prompt (the data module's
    ``prompt_id``, else identical prompt tokens), in every split: the two samples of a pair read as point-wise data sit
    next to each other in the unshuffled validation and test loaders, and a sample paired with an answer to its own
    prompt is no mismatched pair. With a ``copy`` or ``adapter`` reference the partners come from the *same*
    batch (:func:`~ulma_lightning.modules.batching.mismatched_partners`: with distinct prompts, row
    ``i`` takes the response of row ``i - 1``, cyclically; rows of one prompt are grouped and shifted
    past each other), built in the step from the batch alone, so any order of the data works
    (shuffled, length-grouped) and a resumed run pairs exactly as an uninterrupted one. The reference
    runs on the matched and mismatched rows in one forward pass; the policy runs on the mismatched
    rows without gradient (``z0`` is detached, so a backward through them would only add zeros). The
    estimate is the mean over the mismatched pairs of *all* processes (a sum and a count are
    all-reduced), so every rank uses the same ``z0``; a step with no mismatched pair anywhere (a batch
    of one sample, or a batch whose rows all share one prompt) reuses the previous estimate (0 before
    the first).

    With ``reference: precomputed`` the reference cannot run during training, so the mismatched
    pairs are fixed per sample before training: each split gets a seeded ``kl_partner`` (sample ``i``
    is paired with the response of sample ``kl_partner[i]``, of another prompt, by the same rule over
    the whole split in a seeded order; ``-1``, no pair, only if the split has a single prompt), and
    the reference log-probs of those pairs are precomputed and stored as ``reference_kl_logps``
    beside ``reference_logps``. During training the policy runs on the same fixed pairs (the
    partner's tokens are read from the data module), so ``z0`` is still a mean over one mismatched
    pair per sample of the batch, averaged across processes, and it works with shuffled data. A
    split without precomputed values (e.g. ``ulma test`` in a fresh process, where the reference is
    rebuilt) falls back to in-batch pairs and the live reference. The last estimate is saved in
    checkpoints.

    Logged beside the loss: ``kl``, the reference point ``z0`` the loss used (TRL's name and value:
    the estimate clamped at 0, so a policy still close to its reference, or a negative sample
    estimate, reads 0); ``kl_estimate``, the mean log-ratio over the mismatched pairs before the clamp;
    and, as the other methods, ``rewards/accuracy`` and ``rewards/auc`` of KTO's own decision: a sample
    reads as desirable when its log-ratio ``h`` exceeds ``z0`` (``sigmoid(beta (h - z0)) > 0.5``).

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

    #: the reference on every row and on the mismatched pairs (both stored when precomputed)
    spec = MethodSpec(
        precomputed_columns=("reference_logps", "reference_kl_logps"), label_type="binary", reward_metrics=True
    )

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
        check_numbers(
            beta=(beta, "> 0"), desirable_weight=(desirable_weight, "> 0"),
            undesirable_weight=(undesirable_weight, "> 0"), positive_threshold=(positive_threshold, "in [0, 1]"),
        )  # fmt: skip
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
        datamodule = self.data_module
        assert datamodule is not None, "KTO's fixed partners need the trainer's data module"
        dataset = datamodule.datasets[split]
        batch = datamodule.collator([dataset.items[j] for j in partners.long().tolist()])
        return {key: batch[key].to(self.device) for key in SEQUENCE_KEYS}

    @property
    def truncation(self) -> Truncation | None:
        """The data module's truncation, applied to the mismatched pairs too (None without one)."""
        return getattr(self.data_module, "truncation", None)

    def kl_partners(self, batch: dict[str, Tensor]) -> Tensor:
        """Each row's partner: a sample index (fixed ``kl_partner``) or a row of the batch; -1 for none."""
        if "kl_partner" in batch:
            return batch["kl_partner"].long()
        return mismatched_partners(self.prompt_groups(batch)).to(batch["input_ids"].device)

    @staticmethod
    def prompt_groups(batch: dict[str, Any]) -> list[int]:
        """Rows (samples) answering one prompt share a group: the data module's ``prompt_id`` (the
        prompt before truncation), else identical prompt tokens."""
        if "prompt_id" in batch:
            return [int(i) for i in batch["prompt_id"]]
        return prompt_groups(batch["input_ids"], batch["labels"])

    def kl_pairs(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, dict[str, Tensor] | None]:
        """The rows of ``batch`` that have a partner (a mask), and their mismatched pairs: each such
        row's prompt followed by its partner's response (None if no row has a partner)."""
        partners = self.kl_partners(batch)
        rows = partners >= 0
        if not bool(rows.any()):
            return rows, None
        if "kl_partner" in batch:
            responses = self.partner_batch(partners[rows], split)
        else:
            responses = select_rows(batch, partners[rows])
        return rows, swap_responses(select_rows(batch, rows), responses, self.truncation)

    def kl_batch(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor] | None:
        """The mismatched pairs of :meth:`kl_pairs` alone; None if there are none."""
        return self.kl_pairs(batch, split)[1]

    def global_kl(self, differences: Tensor) -> Tensor:
        """Mean of ``log pi - log pi_ref`` over the mismatched pairs of every process, detached."""
        stats = torch.stack(
            [differences.detach().sum(), torch.tensor(float(differences.numel()), device=differences.device)]
        )
        if stats[1] > 0:
            self.kl_local = (stats[0] / stats[1]).cpu()
        if _compat.attached_trainer(self) is not None:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        if stats[1] > 0:
            self.kl = (stats[0] / stats[1]).detach()
        return self.kl.to(differences.device)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The last KL estimate travels too: a resumed run's step without a mismatched pair reuses it."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[KL_KEY] = self.kl.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl = checkpoint.get(KL_KEY, torch.zeros(())).clone()

    # ------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Tensor], stage: Stage) -> LossOutput:
        size = batch["input_ids"].shape[0]
        rows, kl_batch = self.kl_pairs(batch, stage)
        inputs = batch if kl_batch is None else stack_batches(batch, kl_batch)
        policy_logps = self.policy.logps(batch, average=self.average_logps)
        kl_policy = policy_logps[:0]
        if kl_batch is not None:
            with torch.no_grad():  # z0 is detached: no backward through the mismatched pairs
                kl_policy = self.policy.logps(kl_batch, average=self.average_logps)
        if "kl_partner" in batch:  # precomputed values
            reference_logps = batch["reference_logps"].float()
            kl_reference = batch["reference_kl_logps"].float()[rows]
        else:  # the reference runs now (in precomputed mode: a split that was not precomputed, if still loaded)
            reference_all = self.policy.reference_logps(inputs, average=self.average_logps)
            reference_logps, kl_reference = reference_all[:size], reference_all[size:]
        kl = self.global_kl(kl_policy - kl_reference[: kl_policy.shape[0]])
        desirable = batch["score"] >= self.positive_threshold
        out = kto_loss(
            policy_logps,
            reference_logps,
            desirable,
            kl.reshape(1),
            torch.zeros_like(kl).reshape(1),
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        out.metrics["kl_estimate"] = kl.detach()
        ratio = (policy_logps - reference_logps).detach().float()  # KTO's decision: desirable when h > z0
        self.reward_metrics.record(
            self,
            torch.sigmoid(self.beta * (ratio - out.metrics["kl"])),
            desirable,
            self.beta * ratio,
            batch["score"],
            stage,
        )
        return out

    # ------------------------------------------------------------ precomputed reference
    def prepare_precompute(self, split: str) -> None:
        """Fix each sample's KL partner, of another prompt: seeded, identical on every process."""
        datamodule = self.data_module
        assert datamodule is not None, "KTO's fixed partners need the trainer's data module"
        if datamodule.has_column(split, "kl_partner"):
            return
        items = datamodule.datasets[split].items
        columns = {
            key: [item[key] for item in items] for key in ("input_ids", "labels", "prompt_id") if key in items[0]
        }
        partner = mismatched_partners(self.prompt_groups(columns), torch.Generator().manual_seed(self.kl_seed))
        datamodule.set_column(split, "kl_partner", partner)

    def reference_columns(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor]:
        size = batch["input_ids"].shape[0]
        rows, kl_batch = self.kl_pairs(batch, split)
        inputs = batch if kl_batch is None else stack_batches(batch, kl_batch)
        values = self.policy.reference_model_logps(inputs, average=self.average_logps)
        kl = torch.full_like(values[:size], float("nan"))  # NaN where a sample has no partner (never read)
        kl[rows] = values[size:]
        return {"reference_logps": values[:size], "reference_kl_logps": kl}
