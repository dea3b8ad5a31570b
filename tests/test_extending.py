"""The extension API (docs/extending.md): the public loss helpers, options that live on the modules
using them, a class_path switch that would drop a set option, and each example of ``examples/`` run
through ``ulma fit`` for a few steps on the tiny built-in model."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ulma_lightning import PointwiseDPOModule, PointwiseModule, ULMAModule
from ulma_lightning.cli import main
from ulma_lightning.data.errors import DataError
from ulma_lightning.data.sources import Location
from ulma_lightning.losses import dpo_loss, pairwise_output, pointwise_output, reduce_losses, ulma_loss

REPO = Path(__file__).resolve().parents[1]
POLICY = torch.tensor([-1.2, -0.7, -2.0, -0.4, -1.5])
REFERENCE = torch.tensor([-1.0, -0.9, -1.8, -0.6, -1.1])
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("reduction", ["subset_mean", "mean"])
def test_pointwise_output_rebuilds_ulma_loss(reduction: str) -> None:
    """A loss written with the public helper equals the built-in one, value and metrics."""
    builtin = ulma_loss(POLICY, REFERENCE, SCORES, beta=0.1, reduction=reduction)
    positive = SCORES >= 1.0
    losses = torch.where(positive, -POLICY, -torch.nn.functional.logsigmoid(-0.1 * (POLICY - REFERENCE)))
    mine = pointwise_output(losses, positive, POLICY, reduction=reduction, rewards=0.1 * (POLICY - REFERENCE))
    assert torch.equal(mine.loss, builtin.loss)
    assert mine.metrics.keys() == builtin.metrics.keys()
    for name, value in builtin.metrics.items():
        assert torch.allclose(mine.metrics[name], value), name
    assert {k: int(v) for k, v in mine.counts.items()} == {k: int(v) for k, v in builtin.counts.items()}
    assert int(mine.counts["logps/positive"]) == 2


def test_pointwise_output_without_rewards_logs_no_reward_metrics() -> None:
    out = pointwise_output(-POLICY, SCORES >= 1.0, POLICY)
    assert not any(name.startswith("rewards/") for name in out.metrics)
    total, pos, neg = reduce_losses(-POLICY, SCORES >= 1.0, "subset_mean")
    assert torch.equal(out.loss, total) and torch.allclose(total, pos + neg)
    assert float(pos) == pytest.approx((1.2 + 2.0) / 2)


def test_pairwise_output_rebuilds_dpo_loss() -> None:
    chosen, rejected = POLICY[:2], POLICY[2:4]
    ref_c, ref_r = REFERENCE[:2], REFERENCE[2:4]
    builtin = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    losses = -torch.nn.functional.logsigmoid(0.1 * ((chosen - ref_c) - (rejected - ref_r)))
    mine = pairwise_output(losses, chosen, rejected, 0.1 * (chosen - ref_c), 0.1 * (rejected - ref_r))
    assert torch.allclose(mine.loss, builtin.loss)
    assert {k: float(v) for k, v in mine.metrics.items()} == pytest.approx(
        {k: float(v) for k, v in builtin.metrics.items()}
    )


def test_label_options_live_on_the_modules_that_use_them() -> None:
    assert not {"label_type", "continuous_form"} & set(inspect.signature(PointwiseModule.__init__).parameters)
    for cls in (PointwiseDPOModule, ULMAModule):
        assert {"label_type", "continuous_form"} <= set(inspect.signature(cls.__init__).parameters)
    assert PointwiseModule.spec.label_type == "binary"  # what the data module checks scores against


def _print_config(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "ulma.yaml"), *args, "--print_config"])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_switching_class_path_refuses_to_drop_a_set_option(capsys: pytest.CaptureFixture) -> None:
    """ULMA's ``positive_term: beta_sft`` has no place in PointwiseDPOModule: an error, not a silent drop."""
    args = ["--model.init_args.positive_term", "beta_sft", "--model.class_path", "ulma_lightning.PointwiseDPOModule"]
    code, _, err = _print_config(args, capsys)
    assert code != 0
    assert "takes no option positive_term='beta_sft'" in " ".join(err.split())


@pytest.mark.integration
def test_a_callbacks_list_given_whole_replaces_the_configs_list(capsys: pytest.CaptureFixture) -> None:
    """Not a class_path switch: the list replaces configs/ppo.yaml's callbacks, whatever their options (as
    experiments/paper-hh.yaml gives them; position 3 was the config's GenerationSamples with its options)."""
    names = [
        "ulma_lightning.checkpointing.AtomicModelCheckpoint",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "ulma_lightning.callbacks.TokenThroughput",
        "ulma_lightning.callbacks.HFExport",
    ]
    callbacks = "[" + ", ".join(f'{{"class_path": "{name}"}}' for name in names) + "]"
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(REPO / "configs" / "ppo.yaml"), "--trainer.callbacks", callbacks, "--print_config"]
        )
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err
    assert [c["class_path"] for c in yaml.safe_load(out)["trainer"]["callbacks"]] == names


def test_switching_class_path_drops_a_default_option_with_a_warning(capsys: pytest.CaptureFixture) -> None:
    with pytest.warns(UserWarning, match="takes no option positive_term"):
        code, out, _ = _print_config(["--model.class_path", "ulma_lightning.PointwiseDPOModule"], capsys)
    assert code in (0, None)
    model = yaml.safe_load(out)["model"]
    assert model["class_path"] == "ulma_lightning.PointwiseDPOModule" and "positive_term" not in model["init_args"]
    assert model["init_args"]["beta"] == 0.1 and model["init_args"]["label_type"] == "binary"  # the rest carried


def test_the_switch_check_knows_options_taken_through_kwargs() -> None:
    """PPOModule and ULMAModule take their parents' options through ``**kwargs``: the class_path-switch
    check must see those defaults too, or it would refuse an inherited option left at its default."""
    from ulma_lightning.lightning_cli import _defaults_of

    ppo = _defaults_of("ulma_lightning.PPOModule")
    assert ppo["samples_per_prompt"] == 1 and ppo["kl_coef"] == 0.05 and ppo["ppo_epochs"] == 4
    ulma = _defaults_of("ulma_lightning.ULMAModule")
    assert ulma["beta"] == 0.1 and ulma["average_logps"] is True and ulma["positive_term"] == "sft"


def test_a_subclass_passing_kwargs_on_keeps_the_parents_options(capsys: pytest.CaptureFixture) -> None:
    """The example module adds ``margin`` and takes PointwiseModule's options through ``**kwargs``."""
    sys.path.insert(0, str(REPO))
    try:
        args = [
            "--model.class_path",
            "examples.pointwise_loss.HingeNegativeModule",
            "--model.init_args.reduction",
            "mean",
        ]
        args += ["--model.init_args.margin", "2.0"]
        with pytest.warns(UserWarning, match="positive_term"):  # ULMA-only, at its default
            code, out, _ = _print_config(args, capsys)
    finally:
        sys.path.remove(str(REPO))
    assert code in (0, None)
    init_args = yaml.safe_load(out)["model"]["init_args"]
    assert init_args["margin"] == 2.0 and init_args["reduction"] == "mean" and init_args["average_logps"] is True


def test_the_thumbs_format_names_file_line_and_field() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from examples.data_format import parse_thumbs
    finally:
        sys.path.remove(str(REPO))
    location = Location("feedback.jsonl", 7)
    assert parse_thumbs({"question": "q", "answer": "a", "thumbs": "up"}, location).score == 1.0
    with pytest.raises(DataError, match=r"feedback\.jsonl:7: field 'thumbs': expected 'up' or 'down', got 'meh'"):
        parse_thumbs({"question": "q", "answer": "a", "thumbs": "meh"}, location)


@pytest.mark.integration
@pytest.mark.parametrize("example", ["pointwise_loss", "pairwise_loss", "data_format"])
def test_example_runs_through_ulma_fit(tmp_path: Path, example: str) -> None:
    """Each example of docs/extending.md trains two steps with `ulma fit` and logs a finite loss; a loss
    example's YAML states only what is new, after the shipped config of its parent method."""
    base = {
        "pointwise_loss": ["--config", str(REPO / "configs" / "ulma.yaml")],
        "pairwise_loss": ["--config", str(REPO / "configs" / "dpo.yaml")],
    }
    args = [
        "fit", *base.get(example, []), "--config", str(REPO / "examples" / f"{example}.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ulma_lightning.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{example}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    (log_dir,) = tmp_path.glob("*/version_*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss_step")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(events.Scalars("val/loss")[-1].value)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    written = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    assert saved["model"]["class_path"] == written["model"]["class_path"]
    if example in base:  # only the method is new: the class, its new option, nothing of the run
        assert set(written) == {"model"} and set(written["model"]["init_args"]) == {
            "margin" if example == "pointwise_loss" else "gamma"
        }
    else:
        assert saved["data"]["class_path"] == written["data"]["class_path"]
