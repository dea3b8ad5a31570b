"""OnlineULMAModule (issue 25): labels from scores, k samples per prompt, the frozen (and refreshed)
reference, the ULMA step on the fresh labels, option checks, bad scorer output, logging and exact resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from rl_helpers import GEN, LengthScorer, policy, prompts, scalars, small_run, ulma_fit
from rl_helpers import fit as _fit

from ulma_lightning import OnlineULMAModule
from ulma_lightning.evaluation.scorers import Scorer
from ulma_lightning.losses import ulma_loss
from ulma_lightning.modules.base import OptimizerConfig
from ulma_lightning.modules.online_ulma import online_labels


def fit(module: pl.LightningModule, data: pl.LightningDataModule, steps: int = 1, **kwargs) -> pl.Trainer:
    """:func:`rl_helpers.fit` without validation batches."""
    return _fit(module, data, steps, limit_val_batches=0, **kwargs)


class Recorder(Scorer):
    """Length reward that records what it was asked to score."""

    def __init__(self) -> None:
        super().__init__("length")
        self.calls: list[tuple[list, list[str]]] = []

    def score(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [len(r) / 10 for r in responses]


class BadScorer(Scorer):
    def __init__(self, mode: str) -> None:
        super().__init__("bad")
        self.mode = mode

    def score(self, prompts, responses):
        if self.mode == "nan":
            return [float("nan")] + [0.0] * (len(responses) - 1)
        return [0.0] * (len(responses) - 1)


# ------------------------------------------------------------------ labels
def test_top_vs_rest_labels_by_hand() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 0.4])
    labels, kept = online_labels(scores, 4, "top_vs_rest")
    # prompt 1: the best (0.9) is the positive; prompt 2: all tied, left out; prompt 3: both 1.0s are positives
    assert labels.tolist() == [0, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0]
    assert kept.tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_threshold_labels_by_hand() -> None:
    labels, kept = online_labels(torch.tensor([0.0, 0.49, 0.5, 1.0]), 2, "threshold", threshold=0.5)
    assert labels.tolist() == [0, 0, 1, 1] and bool(kept.all())


def test_continuous_labels_by_hand() -> None:
    scores = torch.tensor([-1.0, 0.0, 2.0, 4.0, 5.0, 0.5])
    labels, kept = online_labels(scores, 3, "continuous", score_range=(0.0, 4.0))
    torch.testing.assert_close(labels, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 0.125]))  # min-max, clipped
    sigmoid, _ = online_labels(torch.tensor([0.0, 2.0]), 1, "continuous", score_range=None)
    torch.testing.assert_close(sigmoid, torch.tensor([0.5, 1 / (1 + math.exp(-2.0))]))
    assert bool(kept.all())


def test_online_labels_refuses_an_unknown_mode() -> None:
    with pytest.raises(
        ValueError, match="online_labels: mode must be 'top_vs_rest', 'threshold' or 'continuous', got 'pairs'"
    ):
        online_labels(torch.zeros(4), 2, "pairs")  # type: ignore[arg-type]


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="label_mode must be 'top_vs_rest', 'threshold' or 'continuous', got 'pairs'"):
        OnlineULMAModule(policy(), label_mode="pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_vs_rest compares.*samples_per_prompt must be >= 2, got 1"):
        OnlineULMAModule(policy(), samples_per_prompt=1)
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1, got 0"):
        OnlineULMAModule(policy(), samples_per_prompt=0, label_mode="threshold")
    with pytest.raises(ValueError, match=r"threshold must be in \(lo, hi\] = \(0.0, 1.0\]"):
        OnlineULMAModule(policy(), label_mode="threshold", threshold=1.5)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        OnlineULMAModule(policy(), label_mode="threshold", threshold=float("nan"), score_range=None)
    with pytest.raises(ValueError, match="score_range must be"):
        OnlineULMAModule(policy(), label_mode="continuous", score_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="ref_refresh_every must be >= 1"):
        OnlineULMAModule(policy(), ref_refresh_every=0)
    with pytest.raises(ValueError, match="ref_refresh_every .* needs policy.reference copy without policy.lora"):
        OnlineULMAModule(policy("adapter", lora=True), ref_refresh_every=2)
    with pytest.raises(ValueError, match="positive_term must be 'sft', 'beta_sft' or 'pointwise_dpo', got 'dpo'"):
        OnlineULMAModule(policy(), positive_term="dpo")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes beta"):
        OnlineULMAModule(policy(), kl_coef=0.1)
    OnlineULMAModule(
        policy(), label_mode="threshold", threshold=3.0, score_range=None, samples_per_prompt=1
    )  # unbounded scorer: fine


# ------------------------------------------------------------------ the step
def test_k_samples_per_prompt_are_scored_each_and_the_step_is_ulma_loss() -> None:
    pl.seed_everything(0)
    scorer = Recorder()
    module = OnlineULMAModule(
        policy(), scorer=scorer, generation=GEN, samples_per_prompt=3, label_mode="continuous", score_range=(0.0, 0.6)
    )
    module.configure_model()
    data = prompts(4, 4)
    data.setup("fit")
    batch = data.collator([data.datasets["train"][i] for i in range(4)])
    rollout = module.rollout(batch)
    asked_prompts, asked = scorer.calls[-1]
    assert len(asked) == len(rollout.responses) == 12 and rollout.mask.shape[0] == 12
    assert asked_prompts == [p for p in batch["prompt"] for _ in range(3)]  # k consecutive samples per prompt
    labels, kept = module.labels(rollout)
    torch.testing.assert_close(labels, (rollout.scores / 0.6).clamp(0, 1))
    # the module's loss is ulma_loss on the policy's and the rollout's reference per-token-mean log-probs
    reference = (rollout.reference_logps * rollout.mask).sum(1) / rollout.mask.sum(1)
    with torch.no_grad():
        logps = module.policy.token_logps(rollout.sequences).per_sequence(average=True)
    expected = ulma_loss(logps, reference, labels, beta=1.0, label_type="continuous")
    seen: list[torch.Tensor] = []
    module.minibatch_updates = lambda size, epochs, mbs, step: (
        seen.append(step(torch.arange(size)).loss.detach()),
        {},
    )[1]  # type: ignore[method-assign]
    module.update(rollout)
    torch.testing.assert_close(seen[0], expected.loss)


@pytest.mark.integration
def test_the_reference_stays_frozen_and_refreshes_when_asked() -> None:
    pl.seed_everything(0)
    frozen = OnlineULMAModule(
        policy(), scorer=Recorder(), generation=GEN, samples_per_prompt=2, optimizer=OptimizerConfig(lr=1e-2)
    )
    frozen.configure_model()
    start = {k: v.clone() for k, v in frozen.policy.reference_model.state_dict().items()}
    fit(frozen, prompts(), steps=2)
    assert all(torch.equal(v, start[k]) for k, v in frozen.policy.reference_model.state_dict().items())
    assert not all(torch.equal(v, start[k]) for k, v in frozen.policy.model.state_dict().items())  # the policy moved
    assert not any(p.requires_grad for p in frozen.policy.reference_model.parameters())

    pl.seed_everything(0)
    refreshed = OnlineULMAModule(
        policy(),
        scorer=Recorder(),
        generation=GEN,
        samples_per_prompt=2,
        optimizer=OptimizerConfig(lr=1e-2),
        ref_refresh_every=2,
    )
    seen: list[dict[str, torch.Tensor]] = []
    original = refreshed.refresh_reference
    refreshed.refresh_reference = lambda: (
        original(),
        seen.append({k: v.clone() for k, v in refreshed.policy.reference_model.state_dict().items()}),
    )[0]  # type: ignore[method-assign]
    trainer = fit(refreshed, prompts(), steps=2)
    assert trainer.global_step == 2 and len(seen) == 1  # refreshed once, after step 2
    policy_state = refreshed.policy.model.state_dict()
    assert all(torch.equal(v, policy_state[k]) for k, v in seen[0].items())
    assert not any(p.requires_grad for p in refreshed.policy.reference_model.parameters())


@pytest.mark.integration
@pytest.mark.parametrize(
    "mode,message",
    [
        ("nan", r"scorer BadScorer \(name 'bad'\) returned nan for response 0"),
        ("count", r"scorer BadScorer \(name 'bad'\) returned 3 scores for 4"),
    ],
)
def test_bad_scorer_output_is_named(mode: str, message: str) -> None:
    module = OnlineULMAModule(policy(), scorer=BadScorer(mode), generation=GEN, samples_per_prompt=2)
    with pytest.raises(ValueError, match=message):
        fit(module, prompts(4, 2))


# ------------------------------------------------------------------ the config
@pytest.mark.integration
def test_the_config_logs_reward_positives_kl_length_and_losses(tmp_path: Path) -> None:
    """Online point-wise DPO (``positive_term: pointwise_dpo``) through the config; the SFT positive term runs in the
    resume test."""
    cli = ulma_fit(
        "online_ulma",
        [
            *small_run(tmp_path, steps=2),
            "--model.init_args.label_mode=threshold",
            "--model.init_args.positive_term=pointwise_dpo",
        ],
    )
    assert cli.trainer.global_step == 2 and cli.model.positive_term == "pointwise_dpo"
    logged = scalars(tmp_path)
    for name in (
        "reward",
        "positive_fraction",
        "kl",
        "response_length",
        "loss",
        "loss/positive",
        "loss/negative",
        "time/generate",
        "time/score",
        "time/update",
    ):
        values = logged[f"train/{name}_step"]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), name
    assert all(0 <= v <= 1 for v in logged["train/positive_fraction_step"])
    assert "val/reward" in logged


def _fit_steps(root: Path, steps: int, *extra: str):
    return ulma_fit(
        "online_ulma",
        [*small_run(root, steps=5), "--trainer.limit_train_batches=null", f"--trainer.max_steps={steps}",
         "--model.init_args.optimizer.lr=1e-2", "--model.init_args.ref_refresh_every=2",
         "--model.init_args.label_mode=threshold", "--model.init_args.threshold=0.3", *extra],
    )  # fmt: skip


@pytest.mark.integration
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """3 steps, then ``--ckpt_path last`` to 4 (an epoch is 5 batches): the weights, the refreshed reference
    included (refreshed at step 2, kept in the checkpoint), equal one 4-step run's."""
    whole = _fit_steps(tmp_path / "whole", 4).model.state_dict()
    _fit_steps(tmp_path / "cut", 3)
    last = next((tmp_path / "cut").rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 0
    assert any(
        k.startswith("policy.reference_model.") for k in checkpoint["state_dict"]
    )  # the refreshed reference is saved
    continued = _fit_steps(tmp_path / "cut", 4, f"--ckpt_path={last}")
    assert continued.trainer.global_step == 4
    state = continued.model.state_dict()
    assert state.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(state[name], value), name


@pytest.mark.integration
def test_the_rlhf_benchmark_times_an_online_ulma_step(tmp_path: Path) -> None:
    """benchmarks/bench_rlhf.py's online ULMA row, 1 timed step: every part of the time split is there;
    ``label_mode threshold`` (the like-for-like comparison with RLOO's update) keeps every sample."""
    from benchmarks import bench_rlhf

    bench_rlhf.save_model(tmp_path)
    times = bench_rlhf.ours(tmp_path, 1, "online_ulma")
    assert set(times) >= {"generate", "score", "logprobs", "reference", "update", "step", "tokens", "kept_fraction"}
    assert 0 < times["update"] < times["step"] and times["generate"] > 0
    assert bench_rlhf.ours(tmp_path, 1, "online_ulma", "threshold")["kept_fraction"] == 1.0


@pytest.mark.integration
def test_ulma_export_of_a_module_built_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a checkpoint of an OnlineULMAModule built in Python (not by ``ulma fit``) held the
    parent's ``kl_coef`` beside ``beta`` in its hyper-parameters, and ``ulma export`` stopped with
    "OnlineULMAModule takes beta ..., not kl_coef". It now exports the trained policy."""
    from transformers import AutoModelForCausalLM

    from ulma_lightning.cli import main

    pl.seed_everything(0)
    module = OnlineULMAModule(
        policy(),
        scorer=LengthScorer(),
        generation=GEN,
        samples_per_prompt=2,
        beta=0.3,
        optimizer=OptimizerConfig(lr=1e-2),
    )
    trainer = fit(module, prompts(4, 4))
    trainer.save_checkpoint(tmp_path / "online.ckpt")
    saved = torch.load(tmp_path / "online.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert "kl_coef" not in saved and saved["beta"] == 0.3 and saved["samples_per_prompt"] == 2
    monkeypatch.setattr(sys, "argv", ["ulma"])
    out = main(["export", "--ckpt", str(tmp_path / "online.ckpt"), "--out", str(tmp_path / "hf_model")])
    inputs = torch.tensor([[1, 5, 9, 12, 7, 3]])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=inputs).logits, module.policy.model(input_ids=inputs).logits, rtol=0, atol=1e-6
        )
