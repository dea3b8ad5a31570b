"""Module-level speed work keeps the loss and gradients of the plain computation.

Plain path here: full-vocabulary logits from the model's own forward, every row, every reference.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.conftest import TINY_LLAMA
from ulma_lightning import DPOModule, KTOModule, PolicyConfig, ULMAModule
from ulma_lightning.data.collate import PaddingCollator
from ulma_lightning.data.samplers import LengthGroupedSampler
from ulma_lightning.logprobs import IGNORE_INDEX
from ulma_lightning.losses import dpo_loss, kto_loss, ulma_loss

LENGTHS = [60, 14, 45, 30, 60, 20, 38, 9]  # varied, so length groups form


def _policy(**kw) -> PolicyConfig:
    return PolicyConfig(model_config=dict(TINY_LLAMA), tokenizer="builtin:demo", **kw)


def _built(cls, **kw):
    module = cls(policy=_policy(**kw.pop("policy", {})), **kw)
    module.configure_model()
    return module


def _items(lengths, seed=0, prompt=5):
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, 600, n).astype(np.int64)
        labels = ids.copy()
        labels[:prompt] = IGNORE_INDEX
        items.append({"input_ids": ids, "labels": labels, "score": float(i % 3 == 0), "index": i})
    return items


def _pointwise_batch(lengths=LENGTHS):
    return PaddingCollator(pad_token_id=1)(_items(lengths))


def _plain_logps(model, batch, average):
    """Sequence log-probs from the model's own full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    token = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * keep
    total = token.sum(1)
    return total / keep.sum(1) if average else total


def _grads(module):
    return [p.grad.clone() for p in module.policy.model.parameters()]


def _assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def _library_step(module, batch):
    """The module's own training loss on ``batch``, and its gradients (then zeroed for the plain path)."""
    loss = module.compute_loss(batch, "train").loss
    loss.backward()
    grads = _grads(module)
    module.policy.model.zero_grad()
    return loss, grads


def test_ulma_step_matches_plain_path_and_skips_reference_on_positives():
    module = _built(ULMAModule)
    batch = _pointwise_batch()
    loss, fast = _library_step(module, batch)
    negatives = int((batch["score"] < 1).sum())
    assert module.policy.reference_forward_samples == negatives < len(LENGTHS)

    policy = _plain_logps(module.policy.model, batch, average=True)
    with torch.no_grad():
        reference = _plain_logps(module.policy.reference_model, batch, average=True)
    plain = ulma_loss(policy, reference, batch["score"]).loss
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    _assert_grads_close(fast, _grads(module))


def test_ulma_precomputed_reference_gives_the_same_loss_and_gradients():
    batch = _pointwise_batch()
    copy_ref = _built(ULMAModule)
    pre = _built(ULMAModule, policy={"reference": "precomputed"})
    with torch.no_grad():
        batch_pre = {**batch, **pre.reference_columns(batch, "train")}
    pre.policy.reference_model = None  # as precompute_reference_logps leaves it
    a = copy_ref.compute_loss(batch, "train").loss
    b = pre.compute_loss(batch_pre, "train").loss
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(copy_ref), _grads(pre))


def test_dpo_runs_chosen_and_rejected_in_one_forward_with_the_plain_loss():
    module = _built(DPOModule, policy={"length_groups": 1})
    chosen, rejected = _items(LENGTHS[:4], seed=1), _items(LENGTHS[4:], seed=2)
    items = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        items.append(
            {
                "chosen_input_ids": c["input_ids"],
                "chosen_labels": c["labels"],
                "rejected_input_ids": r["input_ids"],
                "rejected_labels": r["labels"],
                "index": i,
            }
        )
    batch = PaddingCollator(pad_token_id=1)(items)
    calls = {"policy": 0, "reference": 0}
    module.policy.model.get_decoder().register_forward_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1))
    module.policy.reference_model.get_decoder().register_forward_hook(
        lambda *a: calls.__setitem__("reference", calls["reference"] + 1)
    )
    loss, fast = _library_step(module, batch)
    assert calls == {"policy": 1, "reference": 1}

    def side(p: str) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch[p + "input_ids"],
            "attention_mask": batch[p + "attention_mask"],
            "labels": batch[p + "labels"],
        }

    model, ref = module.policy.model, module.policy.reference_model
    with torch.no_grad():
        rc, rr = _plain_logps(ref, side("chosen_"), False), _plain_logps(ref, side("rejected_"), False)
    plain = dpo_loss(
        _plain_logps(model, side("chosen_"), False), _plain_logps(model, side("rejected_"), False), rc, rr
    ).loss
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    _assert_grads_close(fast, _grads(module))


def test_kto_mismatched_pairs_without_policy_gradient_keep_the_loss_and_gradients():
    module = _built(KTOModule)
    batch = _pointwise_batch()
    loss, fast = _library_step(module, batch)

    model, ref = module.policy.model, module.policy.reference_model
    kl_batch = module.kl_batch(batch, "train")
    with torch.no_grad():
        reference, kl_reference = _plain_logps(ref, batch, False), _plain_logps(ref, kl_batch, False)
    kl_policy = _plain_logps(model, kl_batch, False)  # with gradient: the plain path
    plain = kto_loss(_plain_logps(model, batch, False), reference, batch["score"] >= 1, kl_policy, kl_reference).loss
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    _assert_grads_close(fast, _grads(module))


def test_fused_adamw_takes_the_same_step_as_plain_adamw():
    module = _built(ULMAModule)
    fused = module.build_optimizer()
    assert fused.defaults["fused"] is True
    twin = copy.deepcopy(module.policy.model)
    plain = torch.optim.AdamW(twin.parameters(), lr=fused.defaults["lr"], fused=False)
    for p, q in zip(module.policy.model.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused.step()
    plain.step()
    moved = 0
    for p, q, start in zip(
        module.policy.model.parameters(), twin.parameters(), copy.deepcopy(module.policy.reference_model).parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(p, start))
    assert moved > 0


def test_length_grouped_sampler_cuts_padding_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, 400).tolist()
    batch = 8
    order = list(LengthGroupedSampler(lengths, batch, seed=0))
    assert sorted(order) == list(range(len(lengths)))

    def padded(seq):
        return sum(batch * max(lengths[i] for i in seq[k : k + batch]) for k in range(0, len(seq), batch))

    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(order) < 0.7 * padded(shuffled)


@pytest.mark.integration
def test_adamw_is_not_fused_under_loss_scaling():
    """Under ``16-mixed`` on a GPU (a loss scaler) the gradients must be unscaled before clipping, which
    Lightning refuses for a fused AdamW: the optimizer is then the plain kernel; without a scaler, fused."""
    import lightning.pytorch as pl
    import torch.amp

    module = _built(ULMAModule)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.trainer = trainer
    assert module.build_optimizer().defaults["fused"] is True
    trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu")  # what 16-mixed holds on a GPU
    assert not module.build_optimizer().defaults["fused"]
