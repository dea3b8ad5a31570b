"""Policy: building and loading, reference modes, the reference-forward count, dtype and options."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA, make_pointwise_batch
from torch import nn

from ulma_lightning import PointwiseDataModule, PointwiseDPOModule, ULMAModule
from ulma_lightning.losses import ulma_loss
from ulma_lightning.policy import LoraSettings, Policy, PolicyConfig, checkpointing_on

TOKENIZER = "builtin:demo"
SCORES = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # 4 positives, 2 negatives


def build(**kwargs) -> Policy:
    kwargs.setdefault("model_config", TINY_LLAMA)
    kwargs.setdefault("tokenizer", TOKENIZER)
    policy = Policy(PolicyConfig(**kwargs))
    policy.build()
    return policy


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


@pytest.fixture
def batch(demo_tokenizer) -> dict[str, torch.Tensor]:
    return make_pointwise_batch(demo_tokenizer, SCORES)


# ----------------------------------------------------------------------------- building and loading


def test_build_from_model_config(batch) -> None:
    policy = build()
    model = policy.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(policy.tokenizer)
    assert model.config.pad_token_id == policy.tokenizer.pad_token_id
    assert model.config.eos_token_id == policy.tokenizer.eos_token_id
    assert model.config.hidden_size == TINY_LLAMA["hidden_size"]
    assert all(p.requires_grad for p in model.parameters())
    first = next(model.parameters()).clone()
    policy.build()  # idempotent
    assert torch.equal(next(policy.model.parameters()), first)
    # The init is seeded: the same seed gives the same weights, another seed others.
    same, other = build(reference="none"), build(reference="none", init_seed=1)
    with torch.no_grad():
        logps = policy.logps(batch, average=True)
        assert torch.equal(logps, same.logps(batch, average=True))
        assert not torch.allclose(logps, other.logps(batch, average=True))
    assert torch.isfinite(logps).all() and (logps < 0).all()


def test_token_logps_before_build_is_a_clear_error(batch) -> None:
    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, tokenizer=TOKENIZER))
    with pytest.raises(RuntimeError, match=r"build\(\)"):
        policy.logps(batch, average=True)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="model_config"):
        PolicyConfig()
    with pytest.raises(ValueError, match="lora"):
        PolicyConfig(model_config=TINY_LLAMA, tokenizer=TOKENIZER, reference="adapter")
    assert PolicyConfig(model_config=TINY_LLAMA).tokenizer_source == "builtin:demo"  # random init: the demo tokenizer
    with pytest.raises(ValueError, match="set lora.r"):  # adapter options with r 0 (LoRA off) are a mistake
        PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(alpha=32))
    with pytest.raises(ValueError, match="model_type"):
        build(model_config={"hidden_size": 32})


def save_folder(policy: Policy, path: Path) -> Path:
    policy.model.save_pretrained(path)
    policy.tokenizer.save_pretrained(path)
    return path


def test_load_from_local_folder(tmp_path: Path, batch, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = build(reference="none")
    perturb(source.model)
    folder = save_folder(source, tmp_path / "model")
    loaded = build(model=str(folder), model_config=None, tokenizer=None)
    assert loaded.config.tokenizer_source == str(folder)
    text = "\n\nHuman: How do I bake bread?\n\nAssistant: knead the dough"
    assert loaded.tokenizer(text)["input_ids"] == source.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.pad_token_id == source.tokenizer.pad_token_id
    with torch.no_grad():
        expected = source.logps(batch, average=False)
        torch.testing.assert_close(loaded.logps(batch, average=False), expected, rtol=1e-6, atol=0)
        # reference: copy of the loaded policy
        torch.testing.assert_close(loaded.reference_logps(batch, average=False), expected, rtol=1e-6, atol=0)


def test_copy_reference_from_another_folder(tmp_path: Path, batch) -> None:
    """``reference_model`` points the copy at another checkpoint (e.g. an SFT model)."""
    base = build(reference="none")
    policy_dir = save_folder(base, tmp_path / "policy")
    perturb(base.model, seed=3)
    reference_dir = save_folder(base, tmp_path / "reference")
    policy = build(model=str(policy_dir), model_config=None, tokenizer=None, reference_model=str(reference_dir))
    with torch.no_grad():
        torch.testing.assert_close(
            policy.reference_logps(batch, average=True), base.logps(batch, average=True), rtol=1e-6, atol=0
        )
        assert not torch.allclose(policy.logps(batch, average=True), base.logps(batch, average=True))


# ----------------------------------------------------------------------------- reference modes


def test_copy_reference_is_frozen_and_stays_the_initial_policy(batch) -> None:
    policy = build(reference="copy")
    reference = policy.reference_model
    assert reference is not None and reference is not policy.model
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    policy_ptrs = {p.data_ptr() for p in policy.model.parameters()}
    assert not policy_ptrs & {p.data_ptr() for p in reference.parameters()}  # a real copy
    with torch.no_grad():
        initial = policy.logps(batch, average=True)
        torch.testing.assert_close(policy.reference_logps(batch, average=True), initial, rtol=1e-6, atol=0)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        (-policy.logps(batch, average=True).mean()).backward()
        optimizer.step()
    assert all(p.grad is None for p in reference.parameters())
    with torch.no_grad():
        after = policy.logps(batch, average=True)
        reference_after = policy.reference_logps(batch, average=True)
    assert after.mean() > initial.mean() + 1e-3  # the policy learned
    torch.testing.assert_close(reference_after, initial, rtol=1e-6, atol=0)  # the reference did not
    assert reference_after.requires_grad is False


def test_adapter_reference_is_the_base_model(batch) -> None:
    pytest.importorskip("peft", reason="reference: adapter needs peft")
    base = build(reference="none")
    policy = build(reference="adapter", lora=LoraSettings(r=4, alpha=8))
    assert policy.reference_model is None  # no second copy of the weights
    assert type(policy.model).__name__.startswith("Peft")
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        base_logps = base.logps(batch, average=True)
        # LoRA B starts at zero: policy == reference == base
        torch.testing.assert_close(policy.logps(batch, average=True), base_logps, rtol=1e-6, atol=0)
        torch.testing.assert_close(policy.reference_logps(batch, average=True), base_logps, rtol=1e-6, atol=0)
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        moved = policy.logps(batch, average=True)
        reference = policy.reference_logps(batch, average=True)
    assert (moved - base_logps).abs().max() > 1e-3
    torch.testing.assert_close(reference, base_logps, rtol=1e-6, atol=0)
    with torch.no_grad():  # the adapters are enabled again after the reference forward
        torch.testing.assert_close(policy.logps(batch, average=True), moved, rtol=0, atol=0)


def test_none_reference_raises_when_asked(batch) -> None:
    policy = build(reference="none")
    assert policy.reference_model is None
    with pytest.raises(RuntimeError, match="reference is 'none'"):
        policy.reference_logps(batch, average=True)
    with pytest.raises(RuntimeError, match="no reference model"):
        policy.token_logps(batch, reference=True)


def test_precomputed_mode_reads_the_batch_column(batch) -> None:
    policy = build(reference="precomputed")
    perturb(policy.model)
    column = torch.linspace(-3.0, -1.0, len(SCORES))
    with_column = {**batch, "reference_logps": column}
    rows = torch.tensor(SCORES) < 1
    assert torch.equal(policy.reference_logps(with_column, average=True), column)
    masked = policy.reference_logps(with_column, average=True, rows=rows)
    assert torch.equal(masked[rows], column[rows]) and masked[~rows].isnan().all()
    assert policy.reference_forward_samples == 0  # read, not run
    # A split without the column (e.g. `ulma test` in a fresh run) runs the reference while it is loaded.
    with torch.no_grad():
        expected = build(reference="none").logps(batch, average=True)  # same init seed
        torch.testing.assert_close(policy.reference_logps(batch, average=True), expected, rtol=1e-6, atol=0)
    assert policy.reference_forward_samples == len(SCORES)
    policy.reference_model = None  # freed after precomputing
    with pytest.raises(RuntimeError, match="no reference_logps and the reference model was freed"):
        policy.reference_logps(batch, average=True)


class RecordingULMA(ULMAModule):
    """Records the batches and the reference log-probs its loss receives."""

    def compute_loss(self, batch, stage):
        self.seen.append((stage, batch["index"].clone(), batch["score"].clone()))
        return super().compute_loss(batch, stage)

    def loss(self, policy_logps, reference_logps, scores):
        self.references.append(reference_logps.detach().clone())
        return super().loss(policy_logps, reference_logps, scores)


@pytest.mark.integration
def test_precomputed_reference_is_computed_once_and_reused(tmp_path: Path) -> None:
    config = PolicyConfig(model_config=TINY_LLAMA, tokenizer=TOKENIZER, reference="precomputed")
    module = RecordingULMA(config)
    module.seen, module.references = [], []
    data = PointwiseDataModule(
        train="demo://binary?n=40",
        test="demo://binary?split=test&n=8",
        val_fraction=0.25,
        batch_size=8,
        max_length=64,
        tokenizer=TOKENIZER,
    )
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    n_train, n_val, n_test = (len(data.datasets[s]) for s in ("train", "val", "test"))
    # Every train, val and test sample ran through the reference exactly once, before training.
    assert module.policy.reference_forward_samples == n_train + n_val + n_test
    assert module.policy.reference_model is None  # freed
    assert not any(k.startswith("policy.reference_model.") for k in module.state_dict())
    column = data.datasets["train"].extra["reference_logps"]
    assert column.shape == (n_train,) and torch.isfinite(column).all() and (column < 0).all()
    assert data.has_column("val", "reference_logps")
    # The stored values are the initial policy's (same init seed) per-token-mean log-probs.
    fresh = build(reference="none")
    loader = torch.utils.data.DataLoader(data.datasets["train"], batch_size=16, collate_fn=data.collator)
    with torch.no_grad():
        for b in loader:
            torch.testing.assert_close(column[b["index"]], fresh.logps(b, average=True), rtol=1e-5, atol=0)
            torch.testing.assert_close(b["reference_logps"], column[b["index"]])  # items carry the column
    # Both epochs' training steps used the stored values (NaN on positives: ULMA's SFT term skips them).
    train_steps = [(i, s, r) for (stage, i, s), r in zip(module.seen, module.references) if stage == "train"]
    assert len(train_steps) == 4
    for index, scores, reference in train_steps:
        negatives = scores < 1
        assert torch.equal(reference[negatives], column[index][negatives])
        assert reference[~negatives].isnan().all()
    # `trainer.test` in the same process reads the test column: the freed reference is not needed.
    (result,) = trainer.test(module, datamodule=data, verbose=False)
    assert module.policy.reference_forward_samples == n_train + n_val + n_test
    assert math.isfinite(result["test/loss"])


# ----------------------------------------------------------------------------- reference-forward count


def make_module(cls, **kwargs):
    module = cls(PolicyConfig(model_config=TINY_LLAMA, tokenizer=TOKENIZER, reference="copy"), **kwargs)
    module.configure_model()
    return module


def test_ulma_runs_the_reference_on_negatives_only(batch) -> None:
    module = make_module(ULMAModule, beta=0.2)
    perturb(module.policy.model)
    policy = module.policy
    n_negative = SCORES.count(0.0)
    policy.reference_forward_samples = 0
    out = module.compute_loss(batch, "train")
    assert policy.reference_forward_samples == n_negative
    # Same numbers as ULMA with a full reference forward.
    with torch.no_grad():
        full_reference = policy.reference_logps(batch, average=True)
    assert policy.reference_forward_samples == n_negative + len(SCORES)
    expected = ulma_loss(policy.logps(batch, average=True), full_reference, batch["score"], beta=0.2)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    # The reference is never asked for positives in training.
    policy.reference_forward_samples = 0
    module.compute_loss(make_pointwise_batch(policy.tokenizer, [1.0, 1.0, 1.0]), "train")
    assert policy.reference_forward_samples == 0


@pytest.mark.parametrize("lockstep", [False, True])
def test_a_process_without_rows_runs_an_idle_forward_only_in_lockstep(monkeypatch, lockstep: bool) -> None:
    """Under FSDP/FSDP2 on several processes (``lockstep``) a process whose batch has no row for a
    forward still runs it (one row, discarded), since the others may; on one process nothing extra."""
    module = make_module(ULMAModule)
    policy = module.policy
    monkeypatch.setattr(Policy, "lockstep", property(lambda self: lockstep))
    calls = {"policy": 0, "reference": 0}
    for name, model in (("policy", policy.model), ("reference", policy.reference_model)):
        model.get_decoder().register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    positives = make_pointwise_batch(policy.tokenizer, [1.0, 1.0])
    reference = policy.reference_logps(positives, average=True, rows=positives["score"] < 1)  # ULMA: negatives only
    assert reference.isnan().all() and policy.reference_forward_samples == 0  # an idle forward does not count
    module.update_perplexity(make_pointwise_batch(policy.tokenizer, [0.0, 0.0]), [], "val")  # no demonstration
    assert calls == {"policy": int(lockstep), "reference": int(lockstep)}


def test_reference_count_for_other_settings(batch) -> None:
    cases = [
        (PointwiseDPOModule, {}, "train", len(SCORES)),
        (ULMAModule, {"positive_term": "pointwise_dpo"}, "train", len(SCORES)),
        (ULMAModule, {"positive_term": "beta_sft"}, "train", SCORES.count(0.0)),
        (ULMAModule, {}, "val", len(SCORES)),  # eval_reference_on_positives: both classes for AUC
        (ULMAModule, {"eval_reference_on_positives": False}, "val", SCORES.count(0.0)),
    ]
    for cls, kwargs, stage, expected in cases:
        module = make_module(cls, **kwargs)
        module.compute_loss(batch, stage)
        assert module.policy.reference_forward_samples == expected, (cls.__name__, kwargs, stage)


# ----------------------------------------------------------------------------- options


GPT2_DROPOUT = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.5,
    "embd_pdrop": 0.5,
    "attn_pdrop": 0.5,
}


def test_dropout_disabled_by_default(batch) -> None:
    policy = build(model_config=GPT2_DROPOUT)
    dropouts = [m for m in policy.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(m.p == 0.0 for m in policy.reference_model.modules() if isinstance(m, nn.Dropout))
    policy.model.train()
    with torch.no_grad():
        assert torch.equal(policy.logps(batch, average=True), policy.logps(batch, average=True))
    llama = build(model_config={**TINY_LLAMA, "attention_dropout": 0.3})
    attention = [m for m in llama.model.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == 0.0 for m in attention)

    kept = build(model_config=GPT2_DROPOUT, disable_dropout=False, reference="none")
    assert any(m.p == 0.5 for m in kept.model.modules() if isinstance(m, nn.Dropout))
    kept.model.train()
    with torch.no_grad():
        assert not torch.equal(kept.logps(batch, average=True), kept.logps(batch, average=True))


def test_dropout_disabled_in_lora_adapters_too(batch) -> None:
    pytest.importorskip("peft")
    policy = build(lora=LoraSettings(r=4, dropout=0.5), reference="adapter")
    assert all(m.p == 0.0 for m in policy.model.modules() if isinstance(m, nn.Dropout))
    perturb(policy.model)  # non-zero adapters (lora_B starts at 0, which hides their dropout)
    policy.model.train()
    with torch.no_grad():
        assert torch.equal(policy.logps(batch, average=True), policy.logps(batch, average=True))


def test_bfloat16_builds(batch) -> None:
    policy = build(dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in policy.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in policy.reference_model.parameters())
    logps = policy.logps(batch, average=True)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    with torch.no_grad():
        reference = policy.reference_logps(batch, average=True)
        reference_fp32 = build(reference="none").logps(batch, average=True)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(reference, reference_fp32, rtol=0.05, atol=0.05)  # same init, rounded
    loss = ulma_loss(logps, reference, batch["score"]).loss
    loss.backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_gives_the_same_loss(batch) -> None:
    plain = build()
    checkpointed = build(gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecates the old flag's name
        assert checkpointing_on(checkpointed.model) and not checkpointing_on(plain.model)
    results = []
    for policy in (plain, checkpointed):
        policy.model.train()
        layer_calls: list[int] = []
        mlp = policy.model.model.layers[0].mlp
        original_forward = mlp.forward  # counted by hand: module hooks are not run on the recompute

        def counted_forward(*args, **kwargs):
            layer_calls.append(1)  # noqa: B023  (called and removed within this iteration)
            return original_forward(*args, **kwargs)  # noqa: B023

        mlp.forward = counted_forward
        logps = policy.logps(batch, average=True)
        with torch.no_grad():
            reference = policy.reference_logps(batch, average=True) - 0.1
        loss = ulma_loss(logps, reference, batch["score"]).loss
        loss.backward()
        del mlp.forward
        results.append((loss.detach(), [p.grad.clone() for p in policy.model.parameters()], len(layer_calls)))
    assert results[0][2] == 1 and results[1][2] == 2  # checkpointing recomputes the layer in backward
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    assert math.isfinite(float(results[1][0]))
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_policy_and_reward_model_are_siblings() -> None:
    """Model loading is shared by PretrainedModel; the reward model is not a Policy (no log-probs,
    no reference, even when the config asks for a copy), and RewardModelModule names it reward_model."""
    from ulma_lightning import PretrainedModel
    from ulma_lightning.modules.reward import RewardModel, RewardModelModule

    assert issubclass(Policy, PretrainedModel) and issubclass(RewardModel, PretrainedModel)
    assert not issubclass(RewardModel, Policy) and not hasattr(RewardModel, "token_logps")
    reward = RewardModel(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="copy"))
    reward.build()
    assert not hasattr(reward, "reference_model")  # the policy's copy step is the policy's own
    assert (
        type(reward.model).__name__.endswith("ForSequenceClassification")
        and reward.model.config.pad_token_id is not None
    )
    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="copy"))
    policy.build()
    assert policy.reference_model is not None and not any(p.requires_grad for p in policy.reference_model.parameters())
    module = RewardModelModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"))
    assert module.reward_model is module.policy and isinstance(module.reward_model, RewardModel)
    scores = module.score(["Hello?", "How are you?"], ["Hi.", "Fine, thanks."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
