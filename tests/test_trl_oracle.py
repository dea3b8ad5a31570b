"""Oracle tests against TRL (pinned: trl==1.16.0, a test-only dependency).

TRL's losses live inside ``DPOTrainer._compute_loss`` / ``KTOTrainer._compute_loss``, which take a
model and a tokenized batch. We call those methods unbound with a stub ``self`` holding the
attributes they read, and a stub model whose per-token log-probs come from a fixed table, so both
sides see exactly the same log-probs. The reference log-probs go in through TRL's precomputed path.
"""

from __future__ import annotations

from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

trl = pytest.importorskip(
    "trl", reason="the oracle tests compare with TRL (pip install 'ulma-lightning[test]', trl==1.16.0)"
)
from conftest import TINY_LLAMA  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from ulma_lightning import PolicyConfig  # noqa: E402
from ulma_lightning.data.pairwise import PairwiseDataModule  # noqa: E402
from ulma_lightning.logprobs import IGNORE_INDEX  # noqa: E402
from ulma_lightning.losses import dpo_loss, kto_loss  # noqa: E402
from ulma_lightning.modules.batching import pair_batch, side  # noqa: E402
from ulma_lightning.modules.dpo import DPOModule  # noqa: E402
from ulma_lightning.policy import Policy  # noqa: E402

VOCAB = 50


class TableModel:
    """A stand-in for a TRL fused-head model: ``log p(token)`` is ``table[token]`` wherever the label is kept."""

    training = True

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        log_probs = torch.where(keep, self.table[targets.clamp(min=0)], torch.zeros(()))
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def _accelerator() -> SimpleNamespace:
    identity = lambda x: x  # noqa: E731 - one process: gathers are the identity
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity, gather=identity)


def _random_batch(generator: torch.Generator, rows: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a completion mask: a prompt of 2-5 tokens, then 1+ completion tokens, then padding."""
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    completion = torch.zeros(rows, length, dtype=torch.long)
    for i in range(rows):
        start = int(torch.randint(2, 6, (1,), generator=generator))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=generator))
        completion[i, start:end] = 1
    return input_ids, completion


def _summed(table: torch.Tensor, input_ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    return (table[input_ids] * completion)[:, 1:].sum(-1)


def _trl_dpo(
    loss_type: str, beta: float, label_smoothing: float, table, input_ids, completion, ref_chosen, ref_rejected
):
    stub = SimpleNamespace(
        model=TableModel(table),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False), stub._metrics["train"]


@pytest.mark.parametrize(
    "loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.7), ("hinge", 0.1), ("hinge", 0.05)]
)
def test_dpo_loss_matches_trl(loss_type: str, beta: float) -> None:
    g = torch.Generator().manual_seed(7)
    pairs = 6
    table = -torch.rand(VOCAB, generator=g, dtype=torch.float32) * 4
    input_ids, completion = _random_batch(g, 2 * pairs)
    ref = _summed(table, input_ids, completion) + torch.randn(2 * pairs, generator=g)
    ref_chosen, ref_rejected = ref.chunk(2)
    trl_loss, trl_metrics = _trl_dpo(loss_type, beta, 0.0, table, input_ids, completion, ref_chosen, ref_rejected)

    policy = _summed(table, input_ids, completion)
    if loss_type == "ipo":  # IPO on per-token-mean log-probs (TRL divides the log-ratios by the completion length)
        counts = completion.sum(-1).float()
        policy, ref = policy / counts, ref / counts
    chosen, rejected = policy.chunk(2)
    ours = dpo_loss(chosen, rejected, *ref.chunk(2), beta=beta, loss_type=loss_type)

    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert trl_loss.item() > 0
    if loss_type != "ipo":  # TRL logs rewards on summed log-ratios
        assert ours.metrics["rewards/margin"].item() == pytest.approx(
            trl_metrics["rewards/margins"][-1], rel=1e-5, abs=1e-6
        )
        assert ours.metrics["rewards/accuracy"].item() == pytest.approx(trl_metrics["rewards/accuracies"][-1])


def test_dpo_label_smoothing_matches_trl_conservative_form() -> None:
    """TRL 1.16's ``sigmoid`` ignores ``label_smoothing``; its cDPO formula now lives in ``aot``, which
    applies it to *sorted* log-ratios. With inputs already in sorted order the sort is the identity and
    ``aot`` is exactly conservative DPO, which our ``sigmoid`` with ``label_smoothing`` implements."""
    g = torch.Generator().manual_seed(3)
    pairs, eps, beta = 5, 0.2, 0.3
    table = -torch.rand(VOCAB, generator=g) * 4
    input_ids, completion = _random_batch(g, 2 * pairs)
    chosen, rejected = _summed(table, input_ids, completion).chunk(2)
    order = torch.argsort(chosen - rejected)  # sort the pairs by policy log-ratio
    input_ids = torch.cat([input_ids[:pairs][order], input_ids[pairs:][order]])
    completion = torch.cat([completion[:pairs][order], completion[pairs:][order]])
    chosen, rejected = _summed(table, input_ids, completion).chunk(2)
    # reference log-ratios increasing too, so that TRL's sort of them is the identity
    ref_ratio = torch.linspace(-3, 3, pairs)
    ref_rejected = torch.randn(pairs, generator=g) - 20
    ref_chosen = ref_rejected + ref_ratio
    trl_loss, _ = _trl_dpo("aot", beta, eps, table, input_ids, completion, ref_chosen, ref_rejected)
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-6)
    plain = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type="sigmoid")
    assert abs(plain.loss.item() - trl_loss.item()) > 1e-3  # the smoothing term matters here


@pytest.mark.parametrize("weights,labels", [((1.0, 1.0), [1, 0, 1, 1, 0, 0, 1]), ((1.3, 0.7), [0, 1, 0, 0, 1, 0, 1])])
def test_kto_loss_matches_trl(weights: tuple[float, float], labels: list[int]) -> None:
    g = torch.Generator().manual_seed(11)
    rows, beta = len(labels), 0.2
    table = -torch.rand(VOCAB, generator=g) * 3
    input_ids, completion = _random_batch(g, rows)
    kl_ids, kl_completion = _random_batch(g, rows)
    label = torch.tensor(labels, dtype=torch.bool)
    policy, kl_policy = _summed(table, input_ids, completion), _summed(table, kl_ids, kl_completion)
    # reference values below the policy on the KL pairs, so the estimate is positive (not clamped)
    ref = policy + torch.randn(rows, generator=g)
    kl_ref = kl_policy - torch.rand(rows, generator=g)
    stub = SimpleNamespace(
        model=TableModel(table),
        accelerator=_accelerator(),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": kl_completion,
        "label": label,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)
    trl_loss = KTOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    ours = kto_loss(
        policy, ref, label, kl_policy, kl_ref, beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    torch.testing.assert_close(ours.loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert ours.metrics["kl"].item() == pytest.approx(stub._metrics["train"]["kl"][-1], rel=1e-5)
    assert ours.metrics["kl"].item() > 0


@pytest.fixture(scope="module")
def pair_data() -> tuple[Policy, dict[str, torch.Tensor]]:
    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="none"))
    policy.build()
    # the fields DPOTrainer asks of its fused head (log-probs; entropy, logits and top-1 feed its metrics)
    add_fused_lm_head(policy.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    data = PairwiseDataModule(train="demo://pairwise?n=6", batch_size=6, max_length=64)
    data.setup("fit")
    return policy, next(iter(data.train_dataloader()))


def test_policy_summed_logps_match_trl(pair_data) -> None:
    """Our chunked response log-probs, on the concatenated (chosen + rejected, re-padded) batch, equal
    TRL's fused-head log-probs of each side with its own padding: every token within 1e-5, and the
    summed sequence log-probs within 1e-5 up to float32 rounding of sums near -200 (relative 1e-6)."""
    policy, batch = pair_data
    model = policy.model
    both = pair_batch(batch)
    with torch.no_grad():
        tokens = policy.token_logps(both)
    ours = tokens.per_sequence(average=False)
    trl_tokens, trl_sums = [], []
    for prefix in ("chosen_", "rejected_"):
        rows = side(batch, prefix)
        completion = rows["labels"] != IGNORE_INDEX
        labels = rows["input_ids"].masked_fill(~completion, IGNORE_INDEX)
        with torch.no_grad():
            out = model(
                input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], labels=labels, fused_lm_head=True
            )
        trl_tokens.append(out.log_probs[completion[:, 1:]])  # row-major, like TokenLogps.values
        trl_sums.append(out.log_probs.sum(-1))
    trl_tokens, trl_logps = torch.cat(trl_tokens), torch.cat(trl_sums)
    assert ours.dtype == torch.float32 and trl_logps.dtype == torch.float32
    torch.testing.assert_close(tokens.values, trl_tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, trl_logps, rtol=1e-6, atol=1e-5)
    assert trl_logps.abs().min() > 1  # real log-probs, not empty masks


def test_dpo_module_loss_matches_trl_trainer(pair_data) -> None:
    """End to end: DPOModule's loss on a pairwise batch (precomputed reference values) equals
    ``DPOTrainer._compute_loss`` on the same model, tokens and completion masks."""
    policy, batch = pair_data
    module = DPOModule(
        PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="precomputed"), beta=0.3
    )
    module.policy.model = policy.model  # the same (fused-head patched) weights
    g = torch.Generator().manual_seed(5)
    pairs = batch["chosen_input_ids"].shape[0]
    batch = dict(
        batch,
        reference_chosen_logps=-40 - 5 * torch.rand(pairs, generator=g),
        reference_rejected_logps=-40 - 5 * torch.rand(pairs, generator=g),
    )
    ours = module.compute_loss(batch, "train")

    both = pair_batch(batch, pad_token_id=policy.tokenizer.pad_token_id)
    stub = SimpleNamespace(
        model=policy.model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=0.3,
        label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": both["input_ids"],
        "attention_mask": both["attention_mask"],
        "completion_mask": (both["labels"] != IGNORE_INDEX).long(),
        "ref_chosen_logps": batch["reference_chosen_logps"],
        "ref_rejected_logps": batch["reference_rejected_logps"],
    }
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(stub, policy.model, inputs, return_outputs=False)
    torch.testing.assert_close(ours.loss.detach(), trl_loss, rtol=1e-5, atol=1e-5)
    assert ours.metrics["logps/positive"].item() == pytest.approx(stub._metrics["train"]["logps/chosen"][-1], abs=1e-4)
