"""GRPOModule: a step's metrics, beta 0 without a reference model, inner updates, option errors, the
refused torch FSDP1, and configs/grpo.yaml through the CLI (TensorBoard logging, checkpoint,
resume, ``ulma export``, ``ulma evaluate``, your own reward model), 2-process DDP and FSDP2."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import REPO, TINY_LLAMA
from helpers import run_ulma
from rl_helpers import (
    GEN,
    LengthScorer,
    fit,
    policy,
    prompts,
    run_rl_ddp,
    scalars,
    small_run,
    tiny_causal_lm,
    tiny_reward_model,
    ulma_fit,
)

from ulma_lightning import GRPOModule
from ulma_lightning.modules.base import OptimizerConfig


def trainable(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


@pytest.mark.integration
@pytest.mark.parametrize("reference", ["copy", "adapter"])
def test_a_step_trains_and_logs_every_metric(reference: str) -> None:
    pl.seed_everything(0)
    module = GRPOModule(
        policy(reference, lora=reference == "adapter"),
        OptimizerConfig(lr=1e-2),
        scorer=LengthScorer(),
        generation=GEN,
        num_generations=2,
    )
    module.configure_model()
    before = trainable(module)
    trainer = fit(module, prompts())
    assert any(not torch.equal(v, before[k]) for k, v in module.named_parameters() if v.requires_grad), (
        "no trainable weight moved"
    )
    metrics = trainer.callback_metrics
    expected = [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "kl",
        "kl_coef",
        "entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/kl",
    ]
    expected += [
        "response_length",
        "no_eos_fraction",
        "generation/tokens_per_sec",
        "time/generate",
        "time/score",
        "time/reference",
        "time/update",
        "loss",
    ]
    for name in expected:
        assert f"train/{name}_step" in metrics, name
    assert float(metrics["train/kl_coef_step"]) == pytest.approx(0.04)  # beta
    # first update after generation: ratio 1 and reference = initial policy, so the loss is -mean(A) = 0 per group
    assert float(metrics["train/loss_step"]) == pytest.approx(0.0, abs=1e-5)
    assert "val/reward" in metrics
    if reference == "adapter":
        assert module.policy.reference_model is None


@pytest.mark.integration
def test_beta_zero_builds_and_runs_no_reference() -> None:
    pl.seed_everything(0)
    module = GRPOModule(
        policy("copy"), OptimizerConfig(lr=1e-2), scorer=LengthScorer(), generation=GEN, num_generations=2, beta=0.0
    )
    calls: list[bool] = []
    original = module.policy.token_logps
    module.policy.token_logps = lambda batch, reference=False, **kw: (
        calls.append(reference) or original(batch, reference=reference, **kw)
    )  # type: ignore[method-assign]
    module.configure_model()
    assert module.policy.config.reference == "none" and module.policy.reference_model is None
    before = trainable(module)
    trainer = fit(module, prompts())
    assert calls and not any(calls)  # the policy's log-probs only
    assert any(not torch.equal(v, before[k]) for k, v in module.named_parameters() if v.requires_grad)
    metrics = trainer.callback_metrics
    assert (
        "train/time/reference_step" not in metrics and "train/kl_step" not in metrics and "train/loss_step" in metrics
    )
    # beta 0 takes any reference mode (it is not used); beta > 0 needs one the rollouts can score
    GRPOModule(policy("none"), beta=0.0)
    with pytest.raises(ValueError, match="reference.*cannot be precomputed"):
        GRPOModule(policy("none"), beta=0.1)


@pytest.mark.integration
def test_inner_updates_and_mini_batches_follow_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``num_iterations`` passes of ``mini_batch_size`` rows each: 2 x (8 rows / 4) optimiser steps for one
    rollout batch of 4 prompts x 2; each step's loss gets the rows' group-relative advantages (score minus
    the mean of its prompt's pair, ``scale_rewards: none``) and the options."""
    from ulma_lightning.modules import grpo

    pl.seed_everything(0)
    module = GRPOModule(policy(), OptimizerConfig(lr=1e-2), scorer=LengthScorer(), generation=GEN, num_generations=2,
                        num_iterations=2, mini_batch_size=4, scale_rewards="none", loss_type="dr_grpo", clip_range=0.1,
                        clip_range_high=0.3)  # fmt: skip
    rollouts, calls = [], []
    update = module.update
    module.update = lambda rollout: rollouts.append(rollout) or update(rollout)  # type: ignore[method-assign]
    loss = grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda *args, **kw: calls.append((args, kw)) or loss(*args, **kw))
    trainer = fit(module, prompts())
    assert trainer.global_step == 2 * 2 and len(calls) == 4
    (rollout,) = rollouts
    scores = rollout.scores.tolist()
    by_hand = [scores[i] - (scores[i - i % 2] + scores[i - i % 2 + 1]) / 2 for i in range(8)]
    seen = {}
    for (logps, old, advantages, mask, reference), kw in calls:
        assert (
            logps.shape == old.shape == mask.shape == reference.shape and len(advantages) == 4 and logps.requires_grad
        )
        assert kw == {
            "beta": pytest.approx(0.04),
            "clip_range": 0.1,
            "clip_range_high": 0.3,
            "loss_type": "dr_grpo",
            "max_completion_length": GEN.max_new_tokens,
        }
        for row_old, a in zip(old, advantages):  # rows identified by their rollout log-probs
            row = next(i for i in range(8) if torch.equal(rollout.logps[i], row_old))
            seen[row] = float(a)
    assert sorted(seen) == list(range(8))
    assert [seen[i] for i in range(8)] == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"num_generations": 1}, ValueError, "num_generations must be >= 2"),
        ({"clip_range": 0.0}, ValueError, "clip_range must be > 0, got 0.0"),
        ({"clip_range_high": -0.1}, ValueError, "clip_range_high must be > 0"),
        ({"beta": -0.01}, ValueError, "beta must be >= 0, got -0.01"),
        ({"num_iterations": 0}, ValueError, "num_iterations must be >= 1"),
        ({"loss_type": "dapo"}, ValueError, "loss_type must be 'grpo', 'bnpo' or 'dr_grpo', got 'dapo'"),
        ({"scale_rewards": "batch"}, ValueError, "scale_rewards must be 'group' or 'none', got 'batch'"),
        ({"kl_coef": 0.1}, TypeError, "takes beta, not kl_coef"),
        ({"samples_per_prompt": 4}, TypeError, "takes num_generations, not samples_per_prompt"),
    ],
)
def test_bad_options_stop_with_what_to_set(options, error, message) -> None:
    with pytest.raises(error, match=message):
        GRPOModule(policy(), **options)


@pytest.mark.integration
def test_torch_fsdp1_is_refused_with_what_to_use() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDP(FSDPStrategy):  # Lightning refuses its own FSDPStrategy on CPU before the module is set up
        pass

    environ = dict(os.environ)
    module = GRPOModule(policy(), generation=GEN, num_generations=2)
    try:
        with pytest.raises(
            NotImplementedError,
            match=r"GRPOModule does not run under CPUFSDP \(torch FSDP1.*Use --config configs/strategy/fsdp2.yaml",
        ):
            fit(module, prompts(4, 2), strategy=CPUFSDP(), accelerator="cpu", devices=1, precision="32-true")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


# --------------------------------------------------------------------------- configs/grpo.yaml, CLI
@pytest.mark.integration
def test_config_logs_checkpoints_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_tokenizer) -> None:
    """TensorBoard scalars, ``last.ckpt``, the HFExport folder and ``ulma export`` of the checkpoint, which
    loads with the trained policy's logits."""
    from transformers import AutoModelForCausalLM

    from ulma_lightning.cli import main

    cli = ulma_fit("grpo", small_run(tmp_path, steps=2))
    logged = scalars(tmp_path)
    for name in ("train/loss_step", "train/reward_step", "train/kl_step", "train/policy/clipfrac_step", "val/reward"):
        assert name in logged and all(v == v for v in logged[name]), name
    assert len(logged["train/loss_step"]) == 2
    (ckpt,) = tmp_path.rglob("last.ckpt")
    assert next(tmp_path.rglob("hf_model/config.json"))
    monkeypatch.setattr(sys, "argv", ["ulma"])
    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    ids = torch.tensor([demo_tokenizer("a short prompt")["input_ids"]])
    module = cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits,
            module.policy.model(input_ids=ids).logits,
            rtol=0,
            atol=1e-6,
        )


@pytest.mark.integration
def test_resuming_equals_one_uninterrupted_run(tmp_path: Path) -> None:
    """2 rollout batches in one run, or 1 then ``--ckpt_path last`` for the second: the same weights."""
    args = [
        a
        for a in small_run(tmp_path)
        if not a.startswith(("--trainer.limit_train_batches", "--trainer.default_root_dir", "--trainer.logger"))
    ]
    args.append(
        "--model.init_args.scorer=rl_helpers.LengthScorer"
    )  # rewards that differ within a group: every step moves the weights

    def run(root: Path, steps: int, *extra: str):
        return ulma_fit(
            "grpo",
            [
                *args,
                f"--trainer.max_steps={steps}",
                f"--trainer.default_root_dir={root}",
                f"--trainer.logger.init_args.save_dir={root}",
                *extra,
            ],
        )

    whole = run(tmp_path / "whole", 2).model.state_dict()
    run(tmp_path / "cut", 1)
    (last,) = (tmp_path / "cut").rglob("last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 1
    first = saved["state_dict"]  # read now: the resumed run may write its own last.ckpt in the same place
    continued = run(tmp_path / "cut", 2, "--ckpt_path", "last")
    assert continued.trainer.global_step == 2
    assert len(scalars(Path(continued.trainer.logger.log_dir))["train/loss_step"]) == 1  # it ran the second step only
    state = continued.model.state_dict()
    assert state.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(state[name], value), name
    moved = any(
        not torch.equal(first[name], value)
        for name, value in whole.items()
        if name in first and value.is_floating_point()
    )
    assert moved  # the second step changed the weights: the comparison is not of two untrained runs


@pytest.mark.integration
def test_dr_grpo_options_under_bf16_mixed_have_finite_losses(tmp_path: Path) -> None:
    """docs/rlhf.md's Dr. GRPO line (beta 0, dr_grpo, no std scaling) through the CLI, in bf16-mixed."""
    import math

    dr_grpo = [
        "--model.init_args.beta",
        "0",
        "--model.init_args.loss_type",
        "dr_grpo",
        "--model.init_args.scale_rewards",
        "none",
    ]
    cli = ulma_fit(
        "grpo", [*small_run(tmp_path, steps=2), *dr_grpo, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu"]
    )
    module = cli.model
    assert (module.loss_type, module.scale_rewards, float(module.kl_coef)) == (
        "dr_grpo",
        "none",
        0.0,
    ) and module.policy.reference_model is None
    logged = scalars(tmp_path)
    assert len(logged["train/loss_step"]) == 2 and all(
        math.isfinite(v) for v in logged["train/loss_step"] + logged["val/reward"]
    )


@pytest.mark.integration
def test_evaluate_from_the_checkpoint(tmp_path: Path) -> None:
    cfg = str(REPO / "configs" / "grpo.yaml")
    small = [
        f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}",
        "--model.init_args.generation.max_new_tokens=6",
        "--data.init_args.train=demo://demonstration?n=8", "--data.init_args.val=demo://demonstration?split=test&n=4",
        "--data.init_args.test=demo://demonstration?split=test&n=4", "--data.init_args.batch_size=4",
    ]  # fmt: skip
    fitted = run_ulma(
        [
            "fit",
            "--config",
            cfg,
            *small,
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    report_path = tmp_path / "report.json"
    evaluate = run_ulma(
        ["evaluate", "--config", cfg, *small, "--ckpt_path", str(ckpt), "--output", str(report_path),
         "--evaluation.output", str(tmp_path / "predictions.jsonl"),
         "--evaluation.scorers", '[{"class_path": "ulma_lightning.evaluation.DemoScorer"}]'],
        tmp_path,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["test"]["test/reward"] <= 1.0 and report["generation"]["demo"]["n"] == 4


@pytest.mark.integration
def test_own_prompts_and_reward_model_as_in_the_paper_grid(tmp_path: Path) -> None:
    """The paper.yaml row's stage: your SFT model, an exported reward model through HFClassifierScorer's
    ``path`` (the grid's reward_arg), your prompts; beta 0 from the tuning grid."""
    from ulma_lightning.evaluation.scorers import HFClassifierScorer

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"How do I fold shirt {i}?"}) + "\n" for i in range(8)))
    small = [
        a
        for a in small_run(tmp_path / "run")
        if not a.startswith(("--model.init_args.policy.model_config", "--data.init_args.train"))
    ]
    scorer = {"class_path": "ulma_lightning.evaluation.HFClassifierScorer"}
    cli = ulma_fit(
        "grpo",
        [*small, "--model.init_args.policy.model", str(tiny_causal_lm(tmp_path / "sft")),
         "--model.init_args.scorer", json.dumps(scorer),
         "--model.init_args.scorer.init_args.path", str(tiny_reward_model(tmp_path / "reward")),
         "--data.init_args.train", str(prompts_file), "--model.init_args.beta=0.0"],
    )  # fmt: skip
    assert isinstance(cli.model.scorer, HFClassifierScorer) and cli.model.scorer.path == str(tmp_path / "reward")
    assert cli.model.policy.reference_model is None and cli.trainer.global_step == 2


# --------------------------------------------------------------------------- DDP
@pytest.mark.integration
def test_ddp_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    """2 CPU processes (gloo) generate and score their own prompts' groups and end with identical weights."""
    ranks = run_rl_ddp(
        tmp_path,
        "GRPOModule(policy, scorer=LengthScorer(), generation=generation, num_generations=2, num_iterations=2, "
        "mini_batch_size=4)",
    )
    for batch0, batch1 in zip(ranks[0]["index"], ranks[1]["index"]):
        assert set(batch0).isdisjoint(batch1)
    assert len(ranks[0]["index"]) == 2 and ranks[0]["step"] == 2 * 2 * 2  # 2 batches x 2 iterations x 2 mini-batches
    weights0, weights1 = ranks[0]["weights"], ranks[1]["weights"]
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert abs(weights0[name] - weights1[name]) <= 1e-6 * max(1.0, abs(weights0[name])), name


@pytest.mark.integration
def test_fsdp2_decodes_in_lockstep_and_keeps_the_ranks_in_sync(tmp_path: Path) -> None:
    """Under FSDP2 (a sharded policy and reference) rank 0 samples 2 new tokens, rank 1 samples 7:
    rank 0 keeps stepping until rank 1 is done; both end with the same full weights, moved from the start."""
    uneven = "GenerationConfig(max_new_tokens=2 + 5 * RANK, do_sample=True)"
    ranks = run_rl_ddp(
        tmp_path,
        f"GRPOModule(policy, scorer=LengthScorer(), generation={uneven}, num_generations=2, num_iterations=2, "
        "mini_batch_size=4)",
        strategy="fsdp2",
    )
    assert [r["strategy"] for r in ranks] == ["FSDP2Strategy"] * 2 and ranks[0]["step"] == 2 * 2 * 2
    assert all(math.isfinite(loss) for r in ranks for loss in r["losses"])
    weights0, weights1, start = ranks[0]["weights"], ranks[1]["weights"], ranks[0]["start"]
    assert weights0.keys() == weights1.keys() == start.keys() and weights0
    for name in weights0:
        assert abs(weights0[name] - weights1[name]) <= 1e-6 * max(1.0, abs(weights0[name])), name
    assert (
        sum(abs(weights0[name] - start[name]) > 1e-6 * max(1.0, abs(start[name])) for name in weights0)
        > len(weights0) // 2
    )
    reference = {f"policy.model.{k}": v for k, v in ranks[0]["reference"].items()}
    assert (
        reference == {k: v for k, v in start.items() if k in reference} and reference
    )  # the sharded reference stayed frozen
