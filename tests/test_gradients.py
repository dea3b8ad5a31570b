"""The gradient identities of the ULMA paper (section 3.2), with autograd.

With ``u = beta * (log pi - log pi_ref) + offset``:

* ULMA on a positive: exactly the SFT gradient ``-grad log pi`` (no reference, no damping);
* point-wise DPO on a positive: ``-beta * sigma(-u) * grad log pi`` (SFT damped as pi rises);
* the negative term: ``+beta * sigma(u) * grad log pi``, bounded by ``beta``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_LLAMA, make_pointwise_batch

from ulma_lightning.losses import pointwise_dpo_loss, sft_loss, ulma_loss
from ulma_lightning.policy import Policy, PolicyConfig, select_rows

BETA = 0.3
OFFSET = 0.1


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)), written out without overflow."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@pytest.fixture(scope="module")
def policy() -> Policy:
    """A tiny policy whose weights moved away from its reference, so that h != 0."""
    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="copy"))
    policy.build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy


def params_of(policy: Policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.model.parameters() if p.requires_grad]


def assert_grads_close(a, b, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert any(float(x.abs().sum()) > 0 for x in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- with a real tiny model


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
@pytest.mark.parametrize("average", [True, False])
def test_ulma_positive_gradient_is_sft_gradient(policy: Policy, reduction: str, average: bool) -> None:
    batch = make_pointwise_batch(policy.tokenizer, [1, 1, 1, 1])
    params = params_of(policy)
    logps = policy.logps(batch, average=average)
    reference = torch.full_like(logps, float("nan"))  # never needed on positives
    ulma = ulma_loss(logps, reference, batch["score"], beta=BETA, offset=OFFSET, reduction=reduction).loss
    sft = sft_loss(logps).loss
    assert torch.equal(ulma, sft)
    g_ulma = torch.autograd.grad(ulma, params, retain_graph=True)
    g_sft = torch.autograd.grad(sft, params)
    for x, y in zip(g_ulma, g_sft):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


def test_ulma_mixed_batch_gradient_splits_into_sft_plus_negative_term(policy: Policy) -> None:
    """subset_mean: grad ULMA(batch) = grad SFT(positives) + grad ULMA(negatives alone)."""
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    batch = make_pointwise_batch(policy.tokenizer, scores.tolist())
    params = params_of(policy)
    with torch.no_grad():
        reference = policy.reference_logps(batch, average=True)
    mixed = ulma_loss(policy.logps(batch, average=True), reference, scores, beta=BETA, offset=OFFSET).loss
    g_mixed = torch.autograd.grad(mixed, params)

    positives, negatives = scores == 1, scores == 0
    g_sft = torch.autograd.grad(sft_loss(policy.logps(select_rows(batch, positives), average=True)).loss, params)
    neg_batch = select_rows(batch, negatives)
    neg_loss = ulma_loss(
        policy.logps(neg_batch, average=True), reference[negatives], scores[negatives], beta=BETA, offset=OFFSET
    ).loss
    g_neg = torch.autograd.grad(neg_loss, params)
    assert_grads_close(g_mixed, [a + b for a, b in zip(g_sft, g_neg)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", [1.0, 0.0])
def test_pointwise_dpo_per_sample_gradient(policy: Policy, score: float) -> None:
    """Per sample: positive -beta sigma(-u) grad log pi; negative +beta sigma(u) grad log pi."""
    batch = make_pointwise_batch(policy.tokenizer, [score] * 3)
    params = params_of(policy)
    with torch.no_grad():
        reference = policy.reference_logps(batch, average=True)
    logps = policy.logps(batch, average=True)
    for i in range(3):
        u = BETA * float(logps[i].detach() - reference[i]) + OFFSET
        assert abs(u - OFFSET) > 1e-4  # the policy moved: a real weight, not the trivial sigma(offset)
        coefficient = -BETA * sigmoid(-u) if score == 1.0 else BETA * sigmoid(u)
        loss = pointwise_dpo_loss(
            logps[i : i + 1], reference[i : i + 1], batch["score"][i : i + 1], beta=BETA, offset=OFFSET
        ).loss
        g_loss = torch.autograd.grad(loss, params, retain_graph=True)
        g_logp = torch.autograd.grad(logps[i], params, retain_graph=True)
        assert_grads_close(g_loss, [coefficient * g for g in g_logp])
        if score == 0.0:  # ULMA's negative term is the same
            ulma = ulma_loss(
                logps[i : i + 1], reference[i : i + 1], batch["score"][i : i + 1], beta=BETA, offset=OFFSET
            ).loss
            assert_grads_close(torch.autograd.grad(ulma, params, retain_graph=True), g_loss, rtol=1e-6, atol=0)
        else:  # ULMA's positive term is the undamped SFT gradient
            ulma = ulma_loss(
                logps[i : i + 1], reference[i : i + 1], batch["score"][i : i + 1], beta=BETA, offset=OFFSET
            ).loss
            g_ulma = torch.autograd.grad(ulma, params, retain_graph=True)
            assert_grads_close(g_ulma, [-g for g in g_logp], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- on leaf tensors


def test_leaf_gradients_per_sample_in_a_batch() -> None:
    policy = torch.tensor([-1.0, -2.0, -0.5, -3.0, -4.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-1.5, -1.0, -0.5, -2.0, -6.0], dtype=torch.float64)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    u = [BETA * (p - r) + OFFSET for p, r in zip(policy.tolist(), reference.tolist())]

    pointwise_dpo_loss(policy, reference, scores, beta=BETA, offset=OFFSET).loss.backward()
    expected = [-BETA * sigmoid(-u[i]) / 2 if scores[i] == 1 else BETA * sigmoid(u[i]) / 3 for i in range(5)]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-12)

    policy.grad = None
    ulma_loss(policy, reference, scores, beta=BETA, offset=OFFSET).loss.backward()
    expected = [-1.0 / 2 if scores[i] == 1 else BETA * sigmoid(u[i]) / 3 for i in range(5)]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-12)

    policy.grad = None
    ulma_loss(policy, reference, scores, beta=BETA, offset=OFFSET, reduction="mean").loss.backward()
    expected = [-1.0 / 5 if scores[i] == 1 else BETA * sigmoid(u[i]) / 5 for i in range(5)]
    assert policy.grad.tolist() == pytest.approx(expected, rel=1e-12)


H_VALUES = [-1e6, -1e3, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1e3, 1e6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["pointwise_dpo", "ulma"])
def test_negative_push_down_is_bounded(dtype: torch.dtype, which: str) -> None:
    """d loss / d log pi = beta sigma(u) in [0, beta]: finite as log pi -> -inf or far above pi_ref."""
    n = len(H_VALUES)
    reference = torch.full((n,), -50.0, dtype=dtype)
    policy = (reference + torch.tensor(H_VALUES, dtype=dtype)).requires_grad_(True)
    scores = torch.zeros(n, dtype=dtype)
    fn = pointwise_dpo_loss if which == "pointwise_dpo" else ulma_loss
    out = fn(policy, reference, scores, beta=BETA, offset=OFFSET, reduction="mean")
    out.loss.backward()
    grad = policy.grad * n  # per-sample gradient
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad >= 0).all() and (grad <= BETA).all()
    assert (grad[1:] >= grad[:-1]).all()  # grows with pi / pi_ref ...
    assert float(grad[0]) == pytest.approx(0.0, abs=1e-12)  # ... vanishes as log pi -> -inf ...
    assert float(grad[-1]) == pytest.approx(BETA, rel=1e-6)  # ... and saturates at beta
    expected = [BETA * sigmoid(BETA * h + OFFSET) for h in H_VALUES[3:-3]]
    assert grad[3:-3].tolist() == pytest.approx(expected, rel=1e-5)


def test_positive_gradients_damped_for_pointwise_dpo_but_not_ulma() -> None:
    """As pi rises above pi_ref the point-wise DPO positive gradient vanishes; ULMA's stays -1."""
    n = len(H_VALUES)
    reference = torch.full((n,), -50.0, dtype=torch.float64)
    scores = torch.ones(n, dtype=torch.float64)
    policy = (reference + torch.tensor(H_VALUES, dtype=torch.float64)).requires_grad_(True)
    pointwise_dpo_loss(policy, reference, scores, beta=BETA, reduction="mean").loss.backward()
    dpo_grad = policy.grad * n
    assert torch.isfinite(dpo_grad).all() and (dpo_grad <= 0).all() and (dpo_grad >= -BETA).all()
    assert float(dpo_grad[-1]) == pytest.approx(0.0, abs=1e-12) and float(dpo_grad[0]) == pytest.approx(-BETA)
    policy.grad = None
    ulma_loss(policy, reference, scores, beta=BETA, reduction="mean").loss.backward()
    assert (policy.grad * n).tolist() == pytest.approx([-1.0] * n, rel=1e-12)


def test_soft_label_push_is_bounded() -> None:
    """Continuous bce: d loss / d log pi = beta (sigma(u) - z), within [-beta, beta]."""
    h = torch.tensor(H_VALUES, dtype=torch.float64)
    z = torch.linspace(0.0, 0.9, len(H_VALUES), dtype=torch.float64)
    reference = torch.full_like(h, -50.0)
    policy = (reference + h).requires_grad_(True)
    pointwise_dpo_loss(policy, reference, z, beta=BETA, label_type="continuous", reduction="mean").loss.backward()
    grad = policy.grad * len(H_VALUES)
    expected = [BETA * (sigmoid(BETA * x) - s) for x, s in zip(H_VALUES, z.tolist())]
    assert grad.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert (grad.abs() <= BETA).all()
