"""The baseline modules on tiny models: SFT, unlikelihood, KTO, DPO reference modes, the reward model."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, make_pointwise_batch

from ulma_lightning import (
    DemonstrationDataModule,
    DPOModule,
    KTOModule,
    PairwiseDataModule,
    PointwiseDataModule,
    PolicyConfig,
    RewardModelModule,
    SFTModule,
    ULMAModule,
    UnlikelihoodModule,
)
from ulma_lightning.data.demo import generate_pairs, generate_records
from ulma_lightning.data.errors import SkipReport
from ulma_lightning.data.sources import Location
from ulma_lightning.losses import kto_loss, log1m_exp, unlikelihood_loss
from ulma_lightning.modules.batching import pair_batch


def policy_config(reference: str = "copy") -> PolicyConfig:
    return PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference=reference)  # type: ignore[arg-type]


def perturb(module: pl.LightningModule, seed: int = 1) -> None:
    """Move the policy away from its reference, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def fit(module: pl.LightningModule, data: pl.LightningDataModule, steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


# ------------------------------------------------------------------------------------ unlikelihood
def near_one_logits() -> torch.Tensor:
    """Rows of logits whose first token has probability within 1e-7 of 1 (1 - 5e-8, 1 - 8e-9, 1 - 1e-12)."""
    others = 4
    target = torch.tensor([math.log(others / 5e-8), math.log(others / 8e-9), math.log(others / 1e-12)])
    logits = torch.zeros(3, others + 1, dtype=torch.float32)
    logits[:, 0] = target
    return logits.requires_grad_(True)


def test_unlikelihood_is_finite_when_p_is_within_1e7_of_one() -> None:
    logits = near_one_logits()
    logp = torch.log_softmax(logits, dim=-1)[:, 0]
    assert (1 - logp.double().exp() < 1e-7).all()
    naive = -torch.log(1 - logp.exp())  # the formula without care: infinite where p rounds to 1
    assert not torch.isfinite(naive).all()

    out = unlikelihood_loss(logp, torch.arange(3), torch.zeros(3, dtype=torch.bool))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss > 10  # -log(1 - p) is large there, not clipped to 0
    assert torch.isfinite(logits.grad).all()
    # gradient descent raises the other logits, i.e. pushes p(y_t) down
    assert (logits.grad[:, 1:] < 0).all()
    assert (logits.grad[:, 0] >= 0).all()


def test_log1m_exp_matches_the_exact_value_away_from_one() -> None:
    logp = torch.tensor([-20.0, -3.0, -0.7, -1e-3, -1e-5], dtype=torch.float64, requires_grad=True)
    value = log1m_exp(logp)
    torch.testing.assert_close(value, torch.log1p(-logp.exp()))
    value.sum().backward()
    torch.testing.assert_close(logp.grad, -logp.exp() / (1 - logp.exp()))


def test_unlikelihood_welleck_and_authors_variants() -> None:
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(9, generator=g) * 3
    index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    positive = torch.tensor([True, False, True])
    # Welleck, token reduction: NLL on positive tokens, -log(1 - p) on negative ones, mean over tokens
    token_loss = torch.where(positive[index], -token_logps, -torch.log1p(-token_logps.exp()))
    out = unlikelihood_loss(token_logps, index, positive)
    torch.testing.assert_close(out.loss, token_loss.mean())
    sub = unlikelihood_loss(token_logps, index, positive, reduction="subset_mean")
    rows = [token_loss[index == i].mean() for i in range(3)]
    torch.testing.assert_close(sub.loss, (rows[0] + rows[2]) / 2 + rows[1])
    # the authors' variant: -mean over positives + mean over negatives of per-token-mean log-probs
    s = torch.stack([token_logps[index == i].mean() for i in range(3)])
    authors = unlikelihood_loss(token_logps, index, positive, variant="authors")
    torch.testing.assert_close(authors.loss, -(s[0] + s[2]) / 2 + s[1])
    # an empty subset contributes 0, without NaN in loss or gradient
    values = token_logps.clone().requires_grad_(True)
    only_positive = unlikelihood_loss(values, index, torch.ones(3, dtype=torch.bool), variant="authors")
    only_positive.loss.backward()
    torch.testing.assert_close(only_positive.loss, -s.mean())
    assert only_positive.metrics["loss/negative"] == 0 and torch.isfinite(values.grad).all()


def test_unlikelihood_refuses_an_unknown_reduction_for_either_variant() -> None:
    """``reduction`` is unused by ``variant: authors``, but a typo there is refused, not ignored, by the
    loss and by the module (at construction, before the model is built)."""
    bad = r"^reduction must be 'token', 'subset_mean' or 'mean', got 'tokens'$"
    for variant in ("welleck", "authors"):
        with pytest.raises(ValueError, match=bad):
            unlikelihood_loss(
                torch.tensor([-1.0, -2.0]),
                torch.tensor([0, 1]),
                torch.tensor([True, False]),
                variant=variant,
                reduction="tokens",
            )  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=bad):
            UnlikelihoodModule(policy_config("none"), variant=variant, reduction="tokens")  # type: ignore[arg-type]


@pytest.mark.integration
def test_unlikelihood_module_trains_without_reference() -> None:
    module = UnlikelihoodModule(policy_config("copy"))
    data = PointwiseDataModule(train="demo://binary?n=16", batch_size=8, max_length=64)
    fit(module, data, steps=2)
    assert module.policy.reference_model is None and module.policy.config.reference == "none"


# ------------------------------------------------------------------------------------ SFT
def test_sft_loss_is_the_token_mean_cross_entropy_of_hugging_face() -> None:
    module = SFTModule(policy_config("copy"))
    module.configure_model()
    assert module.policy.reference_model is None  # no copy built for a reference-free objective
    data = DemonstrationDataModule(train="demo://demonstration?n=8", batch_size=8, max_length=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ours = module.compute_loss(batch, "train").loss
    hf = module.policy.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5)
    per_sequence = SFTModule(policy_config("none"), reduction="sequence")
    per_sequence.policy.model = module.policy.model
    assert abs(per_sequence.compute_loss(batch, "train").loss.item() - ours.item()) > 1e-6  # a different average


def test_sft_sequence_reduction_is_ulmas_positive_term(demo_tokenizer) -> None:
    """``SFTModule(reduction="sequence")`` is the SFT of ULMA's positives: the mean over sequences of
    per-token mean log-probs (``ulma_loss`` with ``positive_term: sft`` on an all-positive batch)."""
    sft = SFTModule(policy_config(), reduction="sequence")
    sft.configure_model()
    perturb(sft)
    ulma = ULMAModule(policy_config())
    ulma.policy.model = sft.policy.model  # no reference forward: every row is a positive
    batch = make_pointwise_batch(demo_tokenizer, [1.0, 1.0, 1.0, 1.0])  # responses of different lengths
    expected = ulma.compute_loss(batch, "train").loss
    torch.testing.assert_close(sft.compute_loss(batch, "train").loss, expected, rtol=1e-6, atol=1e-6)
    token = SFTModule(policy_config(), reduction="token")
    token.policy.model = sft.policy.model
    assert abs(token.compute_loss(batch, "train").loss.item() - expected.item()) > 1e-4  # the default differs


# ------------------------------------------------------------------------------------ KTO
def kto_setup(desirable: bool) -> tuple[KTOModule, PointwiseDataModule, dict, list[dict]]:
    records = [r for r in generate_records(60, seed=0) if (r["score"] == 1.0) == desirable][:5]
    module = KTOModule(policy_config("copy"), beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
    module.configure_model()
    perturb(module)
    data = PointwiseDataModule(train="demo://binary", batch_size=5, max_length=96)
    examples = [e for i, r in enumerate(records) for e in data.parse_record(r, Location("records", row=i))]
    batch = data.collator(data.build_features(examples, SkipReport("train")))
    return module, data, batch, records


def encode(data: PointwiseDataModule, prompts: list, responses: list[str]) -> dict:
    items = []
    for input_ids, labels in data.encode_examples(prompts, responses):  # type: ignore[misc]
        items.append({"input_ids": input_ids, "labels": labels})
    return data.collator(items)


@pytest.mark.parametrize("desirable", [True, False], ids=["only-desirable", "only-undesirable"])
def test_kto_on_a_single_class_batch(desirable: bool) -> None:
    module, data, batch, records = kto_setup(desirable)
    assert bool((batch["score"] == 1.0).all()) == desirable and bool((batch["score"] == 0.0).all()) != desirable
    out = module.compute_loss(batch, "train")
    out.loss.backward()
    grads = [p.grad for p in module.policy.model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # Independent expectation: mismatched pairs (prompt i, response i-1) tokenized from the records.
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    shifted = encode(data, prompts, responses[-1:] + responses[:-1])
    with torch.no_grad():
        policy = module.policy.logps(batch, average=False)
        reference = module.policy.reference_logps(batch, average=False)
        kl_policy = module.policy.logps(shifted, average=False)
        kl_reference = module.policy.reference_logps(shifted, average=False)
    labels = torch.full((len(records),), desirable)
    expected = kto_loss(
        policy, reference, labels, kl_policy, kl_reference, beta=0.5, desirable_weight=1.5, undesirable_weight=0.5
    )
    torch.testing.assert_close(out.loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    unclamped = (kl_policy - kl_reference).mean()
    assert abs(unclamped) > 1e-3  # the perturbed policy drifted from its reference
    torch.testing.assert_close(module.kl, unclamped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["kl"], unclamped.clamp(min=0), rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_kto_precomputed_reference_works_with_shuffled_data() -> None:
    data = PointwiseDataModule(train="demo://binary?n=24", batch_size=6, max_length=96, split_seed=3)
    module = KTOModule(policy_config("precomputed"))
    fit(module, data, steps=3)  # shuffled (RandomSampler) training on precomputed values
    assert module.policy.reference_model is None and module.global_step == 3
    extra = data.datasets["train"].extra
    partner = extra["kl_partner"]
    size = len(data.datasets["train"])
    assert sorted(partner.tolist()) == list(range(size)) and (partner != torch.arange(size)).all()

    # The stored values are the reference's log-probs of (prompt i) and of (prompt i, response of partner i).
    reference = KTOModule(policy_config("copy"))
    reference.configure_model()
    items = data.datasets["train"].items
    records = generate_records(24, seed=0)
    prompts = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]
    order = [it["index"] for it in items]
    with torch.no_grad():
        matched = reference.policy.logps(data.collator([dict(it) for it in items]), average=False)
        mismatched = encode(data, [prompts[i] for i in order], [responses[int(partner[i])] for i in order])
        kl_reference = reference.policy.logps(mismatched, average=False)
    torch.testing.assert_close(extra["reference_logps"], matched, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(extra["reference_kl_logps"], kl_reference, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------ DPO
@pytest.mark.integration
def test_dpo_precomputed_reference_equals_the_reference_forward() -> None:
    data = PairwiseDataModule(train="demo://pairwise?n=12", batch_size=4, max_length=96)
    module = DPOModule(policy_config("precomputed"))
    fit(module, data, steps=1)
    extra = data.datasets["train"].extra
    reference = DPOModule(policy_config("copy"))
    reference.configure_model()
    batch = data.collator([dict(it) for it in data.datasets["train"].items])
    with torch.no_grad():
        chosen, rejected = reference.policy.logps(pair_batch(batch), average=False).chunk(2)
    torch.testing.assert_close(extra["reference_chosen_logps"], chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(extra["reference_rejected_logps"], rejected, rtol=1e-5, atol=1e-4)
    assert (chosen != rejected).all()


def test_dpo_adapter_reference_is_the_policy_without_lora() -> None:
    pytest.importorskip("peft", reason="LoRA needs peft")
    from ulma_lightning import LoraSettings

    config = PolicyConfig(
        model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="adapter", lora=LoraSettings(r=4)
    )
    module = DPOModule(config)
    module.configure_model()
    assert module.policy.reference_model is None
    data = PairwiseDataModule(train="demo://pairwise?n=4", batch_size=4, max_length=96)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        at_init = module.compute_loss(batch, "train")  # LoRA B = 0: policy == reference, margin 0
        torch.testing.assert_close(at_init.loss, torch.tensor(math.log(2)))
        for name, p in module.policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
        moved = module.compute_loss(batch, "train")
    assert abs(moved.loss.item() - math.log(2)) > 1e-4 and moved.metrics["rewards/margin"] != 0


def test_dpo_average_default_and_missing_reference() -> None:
    assert DPOModule(policy_config(), loss_type="ipo").average_logps is True
    assert DPOModule(policy_config()).average_logps is False
    assert DPOModule(policy_config(), loss_type="ipo", average_logps=False).average_logps is False
    with pytest.raises(ValueError, match="DPOModule needs reference log-probs, but policy.reference"):
        DPOModule(policy_config("none"))


# ------------------------------------------------------------------------------------ reward model
def test_reward_model_score_loss_and_export_agree(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    module = RewardModelModule(policy_config("copy"))
    module.configure_model()
    perturb(module)
    records = generate_pairs(5, seed=2)
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    rewards = module.score(prompts, responses, batch_size=3)
    one_by_one = torch.cat([module.score([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(rewards, one_by_one, rtol=1e-5, atol=1e-5)  # padding does not move the scores
    assert rewards.std() > 0

    # The Bradley-Terry loss of the data path equals the one from score()'s own formatting.
    data = PairwiseDataModule(train="demo://pairwise?n=5&seed=2", batch_size=5, max_length=1024)
    data.setup("fit")
    batch = next(iter(data._loader("train", shuffle=False)))
    with torch.no_grad():
        out = module.compute_loss(batch, "train")
    chosen, rejected = rewards.chunk(2)
    torch.testing.assert_close(out.loss, -F.logsigmoid(chosen - rejected).mean(), rtol=1e-5, atol=1e-5)
    assert out.metrics["rewards/accuracy"] == (chosen > rejected).float().mean()

    # The exported folder is a plain Hugging Face sequence classifier with the same scores.
    path = module.export_hf(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    both = pair_batch(batch, pad_token_id=module.policy.pad_token_id)
    with torch.no_grad():
        hf = loaded(input_ids=both["input_ids"], attention_mask=both["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(hf, rewards, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["bce", "mse"])
def test_reward_model_on_pointwise_scores(form: str) -> None:
    module = RewardModelModule(policy_config(), pointwise_form=form)
    module.configure_model()
    data = PointwiseDataModule(train="demo://continuous?n=6", batch_size=6, max_length=128)
    data.setup("fit")
    batch = next(iter(data._loader("train", shuffle=False)))
    records = generate_records(6, seed=0, label="continuous")
    rewards = module.score([r["prompt"] for r in records], [r["response"] for r in records])
    scores = torch.tensor([r["score"] for r in records])
    with torch.no_grad():
        out = module.compute_loss(batch, "train")
    expected = (
        F.binary_cross_entropy_with_logits(rewards, scores) if form == "bce" else (rewards - scores).square().mean()
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
