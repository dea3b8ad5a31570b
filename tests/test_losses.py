"""Losses against hand computations, empty subsets, and the authors' ULMA loss semantics.

Hand values are written out with ``math`` on small numbers, never with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ulma_lightning.losses import dpo_loss, kto_loss, pointwise_dpo_loss, sft_loss, ulma_loss


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))), written out."""
    return -math.log(1.0 + math.exp(-x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def t(values: list[float], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def close(actual: torch.Tensor, expected: float, tol: float = 1e-12) -> None:
    actual = float(actual.detach())
    assert math.isfinite(actual), actual
    assert abs(actual - expected) <= tol * max(1.0, abs(expected)), (actual, expected)


# Small fixed inputs: policy and reference log-probs, and the u = beta * h + offset they give.
POLICY = [-1.0, -2.0, -0.5, -3.0]
REFERENCE = [-1.5, -1.0, -0.5, -2.0]
BETA, OFFSET = 0.5, 0.2


def u_values(beta: float = BETA, offset: float = OFFSET) -> list[float]:
    return [beta * (p - r) + offset for p, r in zip(POLICY, REFERENCE)]


# ----------------------------------------------------------------------------- point-wise DPO


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
def test_pointwise_dpo_binary_by_hand(reduction: str) -> None:
    scores = [1.0, 0.0, 1.0, 0.0]
    u = u_values()  # [0.45, -0.3, 0.2, -0.3]
    per_sample = [-log_sigmoid(u[0]), -log_sigmoid(-u[1]), -log_sigmoid(u[2]), -log_sigmoid(-u[3])]
    pos, neg = [per_sample[0], per_sample[2]], [per_sample[1], per_sample[3]]
    expected = mean(pos) + mean(neg) if reduction == "subset_mean" else mean(per_sample)
    out = pointwise_dpo_loss(t(POLICY), t(REFERENCE), t(scores), beta=BETA, offset=OFFSET, reduction=reduction)
    close(out.loss, expected)
    for got, want in zip(out.losses.tolist(), per_sample):
        assert got == pytest.approx(want, rel=1e-12)
    if reduction == "subset_mean":
        close(out.metrics["loss/positive"], mean(pos))
        close(out.metrics["loss/negative"], mean(neg))
    else:
        close(out.metrics["loss/positive"], sum(pos) / 4)
        close(out.metrics["loss/negative"], sum(neg) / 4)
    rewards = [BETA * (p - r) for p, r in zip(POLICY, REFERENCE)]
    assert out.rewards.tolist() == pytest.approx(rewards, rel=1e-12)
    close(out.metrics["rewards/positive"], mean([rewards[0], rewards[2]]))
    close(out.metrics["rewards/negative"], mean([rewards[1], rewards[3]]))
    close(out.metrics["logps/positive"], mean([POLICY[0], POLICY[2]]))
    close(out.metrics["positive_fraction"], 0.5)


def test_pointwise_dpo_default_beta_and_offset() -> None:
    """Defaults: beta 0.1, offset 0."""
    scores = [1.0, 0.0, 1.0, 0.0]
    u = u_values(0.1, 0.0)
    expected = mean([-log_sigmoid(u[0]), -log_sigmoid(u[2])]) + mean([-log_sigmoid(-u[1]), -log_sigmoid(-u[3])])
    close(pointwise_dpo_loss(t(POLICY), t(REFERENCE), t(scores)).loss, expected)


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
def test_pointwise_dpo_continuous_bce_by_hand(reduction: str) -> None:
    scores = [1.0, 0.3, 0.0, 0.75]
    u = u_values()
    per_sample = [-log_sigmoid(u[0])] + [
        -(z * log_sigmoid(x) + (1 - z) * log_sigmoid(-x)) for z, x in zip(scores[1:], u[1:])
    ]
    expected = per_sample[0] + mean(per_sample[1:]) if reduction == "subset_mean" else mean(per_sample)
    out = pointwise_dpo_loss(
        t(POLICY), t(REFERENCE), t(scores), beta=BETA, offset=OFFSET, label_type="continuous", reduction=reduction
    )
    close(out.loss, expected)
    assert out.losses.tolist() == pytest.approx(per_sample, rel=1e-12)


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
def test_pointwise_dpo_continuous_mse_by_hand(reduction: str) -> None:
    scores = [1.0, 0.3, 0.0, 0.75]
    u = u_values()
    per_sample = [-log_sigmoid(u[0])] + [(z - x) ** 2 for z, x in zip(scores[1:], u[1:])]
    expected = per_sample[0] + mean(per_sample[1:]) if reduction == "subset_mean" else mean(per_sample)
    out = pointwise_dpo_loss(
        t(POLICY),
        t(REFERENCE),
        t(scores),
        beta=BETA,
        offset=OFFSET,
        label_type="continuous",
        continuous_form="mse",
        reduction=reduction,
    )
    close(out.loss, expected)
    assert out.losses.tolist() == pytest.approx(per_sample, rel=1e-12)


def test_continuous_bce_with_binary_scores_equals_binary() -> None:
    """A soft label of exactly 0 or 1 is the binary cross-entropy."""
    scores = t([1.0, 0.0, 1.0, 0.0])
    binary = pointwise_dpo_loss(t(POLICY), t(REFERENCE), scores, beta=BETA, offset=OFFSET)
    soft = pointwise_dpo_loss(t(POLICY), t(REFERENCE), scores, beta=BETA, offset=OFFSET, label_type="continuous")
    close(soft.loss, float(binary.loss))


# ----------------------------------------------------------------------------- ULMA


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
@pytest.mark.parametrize("positive_term", ["sft", "beta_sft", "pointwise_dpo"])
def test_ulma_binary_by_hand(positive_term: str, reduction: str) -> None:
    scores = [1.0, 0.0, 1.0, 0.0]
    u = u_values()
    if positive_term == "sft":
        pos = [-POLICY[0], -POLICY[2]]
    elif positive_term == "beta_sft":
        pos = [-BETA * POLICY[0], -BETA * POLICY[2]]
    else:
        pos = [-log_sigmoid(u[0]), -log_sigmoid(u[2])]
    neg = [-log_sigmoid(-u[1]), -log_sigmoid(-u[3])]
    expected = mean(pos) + mean(neg) if reduction == "subset_mean" else (sum(pos) + sum(neg)) / 4
    out = ulma_loss(
        t(POLICY), t(REFERENCE), t(scores), beta=BETA, offset=OFFSET, positive_term=positive_term, reduction=reduction
    )
    close(out.loss, expected)
    assert out.losses.tolist() == pytest.approx([pos[0], neg[0], pos[1], neg[1]], rel=1e-12)
    rewards = [BETA * (p - r) for p, r in zip(POLICY, REFERENCE)]
    close(out.metrics["rewards/negative"], mean([rewards[1], rewards[3]]))
    close(out.metrics["logps/negative"], mean([POLICY[1], POLICY[3]]))


@pytest.mark.parametrize("continuous_form", ["bce", "mse"])
@pytest.mark.parametrize("positive_term", ["sft", "beta_sft", "pointwise_dpo"])
def test_ulma_continuous_by_hand(positive_term: str, continuous_form: str) -> None:
    scores = [1.0, 0.3, 0.0, 0.75]
    u = u_values()
    pos_value = {"sft": -POLICY[0], "beta_sft": -BETA * POLICY[0], "pointwise_dpo": -log_sigmoid(u[0])}[positive_term]
    if continuous_form == "bce":
        neg = [-(z * log_sigmoid(x) + (1 - z) * log_sigmoid(-x)) for z, x in zip(scores[1:], u[1:])]
    else:
        neg = [(z - x) ** 2 for z, x in zip(scores[1:], u[1:])]
    out = ulma_loss(
        t(POLICY),
        t(REFERENCE),
        t(scores),
        beta=BETA,
        offset=OFFSET,
        positive_term=positive_term,
        label_type="continuous",
        continuous_form=continuous_form,
    )
    close(out.loss, pos_value + mean(neg))


def test_ulma_positive_threshold_by_hand() -> None:
    """Scores at or above the threshold are positives (SFT); the rest get the continuous term."""
    scores = [1.0, 0.3, 0.8, 0.75]
    threshold = 0.75
    u = u_values()
    pos = [-POLICY[0], -POLICY[2], -POLICY[3]]  # 1.0, 0.8 and 0.75 are positives
    neg = [(0.3 - u[1]) ** 2]
    out = ulma_loss(
        t(POLICY),
        t(REFERENCE),
        t(scores),
        beta=BETA,
        offset=OFFSET,
        positive_threshold=threshold,
        label_type="continuous",
        continuous_form="mse",
    )
    close(out.loss, mean(pos) + mean(neg))
    close(out.metrics["positive_fraction"], 0.75)
    # The default threshold (1.0) makes only the first sample positive.
    default = ulma_loss(
        t(POLICY), t(REFERENCE), t(scores), beta=BETA, offset=OFFSET, label_type="continuous", continuous_form="mse"
    )
    close(default.loss, -POLICY[0] + mean([(z - x) ** 2 for z, x in zip(scores[1:], u[1:])]))


def test_ulma_with_pointwise_dpo_positive_term_is_pointwise_dpo() -> None:
    torch.manual_seed(0)
    policy, reference = -5 * torch.rand(9, dtype=torch.float64), -5 * torch.rand(9, dtype=torch.float64)
    scores = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.float64)
    for reduction in ("subset_mean", "mean"):
        a = ulma_loss(policy, reference, scores, positive_term="pointwise_dpo", reduction=reduction, offset=0.1).loss
        b = pointwise_dpo_loss(policy, reference, scores, reduction=reduction, offset=0.1).loss
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_sft_loss_by_hand() -> None:
    out = sft_loss(t(POLICY))
    close(out.loss, -mean(POLICY))
    close(out.metrics["logps/positive"], mean(POLICY))


# ----------------------------------------------------------------------------- empty subsets


ALL_CASES = [
    ("pointwise_dpo", "binary", "bce", "subset_mean"),
    ("pointwise_dpo", "continuous", "bce", "mean"),
    ("pointwise_dpo", "continuous", "mse", "subset_mean"),
    ("sft", "binary", "bce", "subset_mean"),
    ("sft", "continuous", "mse", "mean"),
    ("beta_sft", "continuous", "bce", "subset_mean"),
    ("ulma_pointwise_dpo", "binary", "bce", "subset_mean"),
]


def _call(kind: str, policy, reference, scores, label_type, continuous_form, reduction):
    kwargs = dict(beta=BETA, offset=OFFSET, label_type=label_type, continuous_form=continuous_form, reduction=reduction)
    if kind == "pointwise_dpo":
        return pointwise_dpo_loss(policy, reference, scores, **kwargs)
    term = "pointwise_dpo" if kind == "ulma_pointwise_dpo" else kind
    return ulma_loss(policy, reference, scores, positive_term=term, **kwargs)


@pytest.mark.parametrize("kind,label_type,continuous_form,reduction", ALL_CASES)
def test_empty_positive_subset(kind, label_type, continuous_form, reduction) -> None:
    scores = [0.0, 0.0, 0.0, 0.0] if label_type == "binary" else [0.0, 0.3, 0.6, 0.9]
    policy = t(POLICY, requires_grad=True)
    out = _call(kind, policy, t(REFERENCE), t(scores), label_type, continuous_form, reduction)
    u = u_values()
    if label_type == "binary":
        neg = [-log_sigmoid(-x) for x in u]
    elif continuous_form == "bce":
        neg = [-(z * log_sigmoid(x) + (1 - z) * log_sigmoid(-x)) for z, x in zip(scores, u)]
    else:
        neg = [(z - x) ** 2 for z, x in zip(scores, u)]
    assert float(out.metrics["loss/positive"]) == 0.0
    close(out.loss, mean(neg))
    close(out.metrics["loss/negative"], mean(neg))
    out.loss.backward()
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad != 0).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("kind,label_type,continuous_form,reduction", ALL_CASES)
def test_empty_negative_subset(kind, label_type, continuous_form, reduction) -> None:
    policy = t(POLICY, requires_grad=True)
    needs_reference = kind in ("pointwise_dpo", "ulma_pointwise_dpo")
    # Without a reference term on positives, NaN reference entries must be ignored entirely.
    reference = t(REFERENCE) if needs_reference else t([float("nan")] * 4, requires_grad=True)
    out = _call(kind, policy, reference, t([1.0] * 4), label_type, continuous_form, reduction)
    u = u_values()
    if needs_reference:
        pos = [-log_sigmoid(x) for x in u]
    elif kind == "sft":
        pos = [-p for p in POLICY]
    else:
        pos = [-BETA * p for p in POLICY]
    assert float(out.metrics["loss/negative"]) == 0.0
    close(out.loss, mean(pos))
    close(out.metrics["loss/positive"], mean(pos))
    out.loss.backward()
    assert torch.isfinite(policy.grad).all()
    if not needs_reference:
        assert reference.grad is None or torch.equal(reference.grad, torch.zeros(4, dtype=torch.float64))
        slope = -1.0 if kind == "sft" else -BETA
        assert policy.grad.tolist() == pytest.approx([slope / 4] * 4, rel=1e-12)


@pytest.mark.parametrize("positive_term", ["sft", "beta_sft"])
@pytest.mark.parametrize(
    "label_type,continuous_form", [("binary", "bce"), ("continuous", "bce"), ("continuous", "mse")]
)
def test_ulma_nan_reference_at_positives_is_ignored(positive_term, label_type, continuous_form) -> None:
    """The reference is never read on positives: NaN there changes neither loss nor gradient."""
    scores = t([1.0, 0.0, 1.0, 0.0])
    reference_nan = t([float("nan"), REFERENCE[1], float("nan"), REFERENCE[3]], requires_grad=True)
    reference_num = t([123.0, REFERENCE[1], -77.0, REFERENCE[3]], requires_grad=True)
    results = []
    for reference in (reference_nan, reference_num):
        policy = t(POLICY, requires_grad=True)
        out = ulma_loss(
            policy,
            reference,
            scores,
            beta=BETA,
            offset=OFFSET,
            positive_term=positive_term,
            label_type=label_type,
            continuous_form=continuous_form,
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all() and torch.isfinite(reference.grad).all()
        assert reference.grad[0] == 0 and reference.grad[2] == 0
        assert torch.isfinite(out.losses).all()
        assert all(torch.isfinite(v).all() for v in out.metrics.values())
        results.append((out.loss.detach(), policy.grad.clone(), reference.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])
    slope = -1.0 if positive_term == "sft" else -BETA
    assert results[0][1][0] == pytest.approx(slope / 2, rel=1e-12)  # mean over the two positives


# ----------------------------------------------------------------------------- authors' semantics


def authors_ulma_loss(policy_logps, reference_logps, score, *, beta, constant_zx, sft_loss_type, preference_loss_type):
    """An independent restatement of ``ULMATrainer.ulma_loss`` (github.com/Unified-Language-Model-Alignment/src,
    ``src/llmtuner/tuner/ulma/trainer.py``): boolean indexing, ``.mean()`` over each subset (NaN when
    empty), then ``nan_to_num`` on each part."""
    logits = policy_logps - reference_logps
    negatives, positives = score != 1, score == 1
    if preference_loss_type == "continuous":
        preference = (score[negatives] - beta * logits[negatives] - constant_zx).square().mean()
    else:
        preference = -F.logsigmoid(-beta * logits[negatives] - constant_zx).mean()
    if sft_loss_type == "logloss":
        sft = -policy_logps[positives].mean()
    elif sft_loss_type == "beta_logloss":
        sft = -beta * policy_logps[positives].mean()
    else:  # "pointwise_dpo"
        sft = -F.logsigmoid(beta * logits[positives] + constant_zx).mean()
    return torch.nan_to_num(sft, nan=0.0) + torch.nan_to_num(preference, nan=0.0)


OURS = {"logloss": "sft", "beta_logloss": "beta_sft", "pointwise_dpo": "pointwise_dpo"}


@pytest.mark.parametrize("preference_loss_type", ["continuous", "binary"])
@pytest.mark.parametrize("sft_loss_type", ["logloss", "beta_logloss", "pointwise_dpo"])
@pytest.mark.parametrize("constant_zx", [0.0, 0.3])
def test_ulma_equals_authors_loss(preference_loss_type, sft_loss_type, constant_zx) -> None:
    generator = torch.Generator().manual_seed(7)
    for trial in range(12):
        size = [1, 2, 5, 8][trial % 4]
        # per-token-mean log-probs, as the authors' code computes them
        policy_values = -3 * torch.rand(size, generator=generator, dtype=torch.float64)
        reference = -3 * torch.rand(size, generator=generator, dtype=torch.float64)
        beta = [0.1, 0.5, 2.0][trial % 3]
        mode = trial % 3  # 0: mixed, 1: all positive, 2: all negative
        if preference_loss_type == "binary":
            scores = (torch.rand(size, generator=generator) < 0.5).double()
        else:
            scores = torch.rand(size, generator=generator, dtype=torch.float64)
            scores[torch.rand(size, generator=generator) < 0.4] = 1.0
        if mode == 1:
            scores = torch.ones(size, dtype=torch.float64)
        elif mode == 2:
            scores = torch.where(scores == 1, torch.zeros_like(scores), scores)
        ours_policy = policy_values.clone().requires_grad_(True)
        their_policy = policy_values.clone().requires_grad_(True)
        ours = ulma_loss(
            ours_policy,
            reference,
            scores,
            beta=beta,
            offset=constant_zx,
            positive_term=OURS[sft_loss_type],
            label_type=preference_loss_type,
            continuous_form="mse",
            reduction="subset_mean",
        ).loss
        theirs = authors_ulma_loss(
            their_policy,
            reference,
            scores,
            beta=beta,
            constant_zx=constant_zx,
            sft_loss_type=sft_loss_type,
            preference_loss_type=preference_loss_type,
        )
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14), (trial, scores, float(ours), float(theirs))
        ours.backward()
        theirs.backward()
        assert torch.allclose(ours_policy.grad, their_policy.grad, rtol=1e-10, atol=1e-14), trial


# ----------------------------------------------------------------------------- pairwise DPO and KTO


def test_dpo_sigmoid_by_hand() -> None:
    pc, pr, rc, rr = [-1.0, -4.0], [-2.0, -1.0], [-1.5, -3.0], [-1.5, -2.0]
    beta = 0.5
    # m = (pc - rc) - (pr - rr): (0.5 - (-0.5), -1.0 - 1.0)
    margins = [1.0, -2.0]
    assert [(a - c) - (b - d) for a, b, c, d in zip(pc, pr, rc, rr)] == margins
    expected = mean([-log_sigmoid(beta * m) for m in margins])
    out = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta)
    close(out.loss, expected)
    close(out.metrics["rewards/positive"], mean([beta * 0.5, beta * -1.0]))
    close(out.metrics["rewards/negative"], mean([beta * -0.5, beta * 1.0]))
    close(out.metrics["rewards/accuracy"], 0.5)
    eps = 0.2
    smoothed = mean([-(1 - eps) * log_sigmoid(beta * m) - eps * log_sigmoid(-beta * m) for m in margins])
    close(dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, label_smoothing=eps).loss, smoothed)


def test_dpo_ipo_and_hinge_by_hand() -> None:
    pc, pr, rc, rr = [-1.0, -4.0, -2.0], [-2.0, -1.0, -6.0], [-1.5, -3.0, -2.0], [-1.5, -2.0, -2.0]
    beta = 0.25
    margins = [1.0, -2.0, 4.0]
    ipo = mean([(m - 1 / (2 * beta)) ** 2 for m in margins])  # (1-2)^2, (-2-2)^2, (4-2)^2
    assert ipo == pytest.approx((1 + 16 + 4) / 3)
    close(dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type="ipo").loss, ipo)
    hinge = mean([max(0.0, 1 - beta * m) for m in margins])  # 0.75, 1.5, 0
    assert hinge == pytest.approx(0.75)
    close(dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=beta, loss_type="hinge").loss, hinge)


def test_kto_by_hand() -> None:
    policy, reference, labels = [-1.0, -2.0, -3.0], [-1.5, -1.0, -2.0], [1.0, 0.0, 1.0]
    kl_policy, kl_reference = [-2.0, -3.0, -4.0], [-2.5, -3.0, -4.2]
    beta, wd, wu = 0.5, 1.5, 0.7
    z0 = max(0.0, mean([a - b for a, b in zip(kl_policy, kl_reference)]))  # (0.5 + 0 + 0.2) / 3
    r = [p - q for p, q in zip(policy, reference)]

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    per_sample = [
        wd * (1 - sigmoid(beta * (r[0] - z0))),
        wu * (1 - sigmoid(beta * (z0 - r[1]))),
        wd * (1 - sigmoid(beta * (r[2] - z0))),
    ]
    out = kto_loss(
        t(policy),
        t(reference),
        t(labels),
        t(kl_policy),
        t(kl_reference),
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    close(out.loss, mean(per_sample))
    close(out.metrics["kl"], z0)
    # A negative KL estimate is clamped to 0.
    clamped = kto_loss(t(policy), t(reference), t(labels), t([-3.0]), t([-2.0]), beta=beta)
    close(clamped.metrics["kl"], 0.0)
    expected = mean([1 - sigmoid(beta * r[0]), 1 - sigmoid(-beta * r[1]), 1 - sigmoid(beta * r[2])])
    close(clamped.loss, expected)


def test_kto_kl_baseline_has_no_gradient() -> None:
    kl_policy = t([-1.0, -1.0], requires_grad=True)
    policy = t([-1.0, -2.0], requires_grad=True)
    kto_loss(policy, t([-2.0, -2.0]), t([1.0, 0.0]), kl_policy, t([-2.0, -2.0])).loss.backward()
    assert kl_policy.grad is None or torch.equal(kl_policy.grad, torch.zeros(2, dtype=torch.float64))
    assert (policy.grad != 0).all()


# ----------------------------------------------------------------------------- bad arguments


def test_binary_labels_must_be_zero_or_one() -> None:
    for fn in (pointwise_dpo_loss, ulma_loss):
        with pytest.raises(ValueError, match=r"label_type='binary'.*\{0, 1\}.*continuous"):
            fn(t(POLICY), t(REFERENCE), t([1.0, 0.5, 0.0, 1.0]))


def test_continuous_labels_must_be_in_unit_interval() -> None:
    for fn in (pointwise_dpo_loss, ulma_loss):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(t(POLICY), t(REFERENCE), t([1.0, 1.5, 0.0, 1.0]), label_type="continuous")
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(t(POLICY), t(REFERENCE), t([1.0, -0.1, 0.0, 1.0]), label_type="continuous")


@pytest.mark.parametrize(
    "policy,reference,scores",
    [
        ([-1.0, -2.0], [-1.0, -2.0, -3.0], [1.0, 0.0]),
        ([-1.0, -2.0], [-1.0, -2.0], [1.0, 0.0, 1.0]),
        ([[-1.0, -2.0]], [[-1.0, -2.0]], [[1.0, 0.0]]),
    ],
)
def test_shapes_are_checked(policy, reference, scores) -> None:
    for fn in (pointwise_dpo_loss, ulma_loss):
        with pytest.raises(ValueError, match=r"1-D tensors of one shape \(B,\)"):
            fn(t(policy), t(reference), t(scores))
    with pytest.raises(ValueError, match=r"1-D tensors"):
        dpo_loss(t(policy), t(reference), t(scores), t(policy))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"label_type": "soft"}, "label_type must be"),
        ({"reduction": "sum"}, "reduction must be"),
        ({"label_type": "continuous", "continuous_form": "l1"}, "continuous_form must be"),
        ({"continuous_form": "l1"}, "continuous_form must be"),
    ],
)
def test_bad_options_raise(kwargs, pattern) -> None:
    for fn in (pointwise_dpo_loss, ulma_loss):
        with pytest.raises(ValueError, match=pattern):
            fn(t(POLICY), t(REFERENCE), t([1.0, 0.0, 1.0, 0.0]), **kwargs)


def test_bad_positive_term_and_loss_type_raise() -> None:
    with pytest.raises(ValueError, match="positive_term must be"):
        ulma_loss(t(POLICY), t(REFERENCE), t([1.0, 0.0, 1.0, 0.0]), positive_term="nll")
    with pytest.raises(ValueError, match="loss_type must be"):
        dpo_loss(t(POLICY), t(POLICY), t(REFERENCE), t(REFERENCE), loss_type="robust")


def test_pointwise_dpo_positive_threshold_splits_the_subsets() -> None:
    policy = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([-1.5, -1.0, -2.0])
    scores = torch.tensor([0.7, 0.2, 1.0])
    out = pointwise_dpo_loss(
        policy, reference, scores, label_type="continuous", positive_threshold=0.5, reduction="mean"
    )
    u = 0.1 * (policy - reference)
    expected_first = math.log1p(math.exp(-float(u[0])))  # -log sigma(u): treated as a positive
    assert out.losses[0].item() == pytest.approx(expected_first, rel=1e-6)
    assert out.metrics["positive_fraction"].item() == pytest.approx(2 / 3)
