"""The ``ulma`` command: a real fit in a subprocess (TensorBoard scalars, HF export, checkpoint),
validate and test on its checkpoint, ``--print_config`` for every config, each shipped config for a
couple of steps, and a research subclass that overrides the loss through ``--model.class_path``."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import run_cli

from ulma_lightning.cli import EXTRA_COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def tiny_overrides(root: Path, *, label: str = "binary", steps: int = 3) -> list[str]:
    """Overrides that keep a run to a few steps on small demo data, writing under ``root``."""
    return [
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(steps),
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.train", f"demo://{label}?n=48",
        "--data.init_args.test", f"demo://{label}?split=test&n=12",
        "--data.init_args.batch_size", "6",
    ]  # fmt: skip


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in the TensorBoard event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs get their arguments from ``main(args)``, not from pytest's command line."""
    monkeypatch.setattr(sys, "argv", ["ulma"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log folder of ``ulma fit --config configs/ulma.yaml`` run for 3 steps in a subprocess."""
    root = tmp_path_factory.mktemp("fit")
    run_cli(["fit", "--config", str(REPO / "configs" / "ulma.yaml"), *tiny_overrides(root)], cwd=root)
    (log_dir,) = (root / "ulma").glob("version_*")
    return log_dir


@pytest.mark.integration
def test_fit_writes_tensorboard_scalars(fitted: Path) -> None:
    series = scalars(fitted)
    for tag in (
        "train/loss_step", "train/loss_epoch", "train/loss/positive_step", "train/loss/negative_step",
        "train/rewards/negative_step", "train/logps/positive_step", "train/logps/negative_step",
        "train/positive_fraction_step", "train/tokens_per_sec_step",
        "val/loss", "val/rewards/accuracy", "val/rewards/auc", "val/rewards/positive", "val/logps/negative",
    ):  # fmt: skip
        assert tag in series, f"{tag} missing from {sorted(series)}"
        assert all(math.isfinite(v) for v in series[tag]), tag
    assert len(series["train/loss_step"]) == 3  # one per step
    assert any(tag.startswith("lr-AdamW") for tag in series)
    assert all(v > 0 for v in series["train/tokens_per_sec_step"])


@pytest.mark.integration
def test_fit_exports_a_loadable_hugging_face_folder(fitted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fitted / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == 96 and tokenizer.eos_token == "<|endoftext|>"
    # the exported weights are the trained policy's, as in the last checkpoint
    checkpoint = torch.load(fitted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    policy = {
        k[len("policy.model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.model.")
    }
    exported = model.state_dict()
    assert policy and set(policy) <= set(exported)
    assert all(torch.equal(exported[name], value) for name, value in policy.items())
    assert not any(k.startswith("policy.reference_model.") for k in checkpoint["state_dict"])  # rebuilt, not stored
    ids = tokenizer("\n\nHuman: How do I make tea?\n\nAssistant:", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    # the run's resolved config is saved beside the logs
    saved = yaml.safe_load((fitted / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "ulma_lightning.ULMAModule"
    assert saved["data"]["init_args"]["train"] == "demo://binary?n=48"


@pytest.mark.integration
@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_on_the_saved_checkpoint(fitted: Path, command: str) -> None:
    checkpoint = fitted / "checkpoints" / "last.ckpt"
    cli = main([command, "--config", str(fitted / "config.yaml"), "--ckpt_path", str(checkpoint)])
    stage = "val" if command == "validate" else "test"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for name in ("loss", "rewards/accuracy", "rewards/auc", "logps/positive", "logps/negative"):
        assert math.isfinite(metrics[f"{stage}/{name}"]), name
    # the checkpoint's weights were evaluated, not a fresh initialisation
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    name = next(k for k in state if k.startswith("policy.model.") and k.endswith("weight"))
    assert torch.equal(cli.model.state_dict()[name].cpu(), state[name])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_print_config(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == written["model"]["class_path"]
    # every model and data argument the file sets survives, and the defaults are filled in
    for section in ("model", "data"):
        for key, value in written[section]["init_args"].items():
            if isinstance(value, dict):
                assert value.items() <= printed[section]["init_args"][key].items(), (section, key)
            else:
                assert printed[section]["init_args"][key] == value, (section, key)
    assert printed["model"]["init_args"]["policy"]["tokenizer"] is None  # the model's own (demo for model_config)
    lora = printed["model"]["init_args"]["policy"]["lora"]  # LoRA's options are shown, off (r 0)
    assert set(lora) == {"r", "alpha", "dropout", "target_modules"} and lora["r"] == 0
    assert "on_bad_record" in printed["data"]["init_args"]


NEW_CONFIGS = {
    "pointwise_dpo": ("PointwiseDPOModule", "binary"),
    "ulma_continuous": ("ULMAModule", "continuous"),
    "pointwise_dpo_continuous": ("PointwiseDPOModule", "continuous"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_each_config_fits_a_couple_of_steps(tmp_path: Path, name: str) -> None:
    module, label = NEW_CONFIGS[name]
    cli = main(
        ["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), *tiny_overrides(tmp_path, label=label, steps=2)]
    )
    assert type(cli.model).__name__ == module
    assert cli.model.label_type == label and cli.model.continuous_form == "bce"
    assert cli.trainer.global_step == 2
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    scores = {item["score"] for item in cli.datamodule.datasets["train"].items}
    if label == "continuous":
        assert any(0.0 < s < 1.0 for s in scores)
    else:
        assert scores == {0.0, 1.0}
    assert (tmp_path / name / "version_0" / "hf_model" / "config.json").exists()


SUBCLASS = '''
    """A research loss: ULMA plus a constant, passed to the CLI by class_path."""
    from pathlib import Path

    import torch

    from ulma_lightning import ULMAModule


    class MyULMA(ULMAModule):
        def loss(self, policy_logps, reference_logps, scores):
            out = super().loss(policy_logps, reference_logps, scores)
            with open(Path(__file__).with_name("calls.txt"), "a") as handle:
                handle.write(f"{len(scores)}\\n")
            out.metrics["ulma"] = out.loss.detach()
            out.metrics["custom"] = torch.tensor(42.0)
            out.loss = out.loss + 1.0
            return out
'''


@pytest.mark.integration
def test_subclass_overrides_the_loss_through_the_cli(tmp_path: Path) -> None:
    (tmp_path / "my_research.py").write_text(textwrap.dedent(SUBCLASS))
    args = ["fit", "--config", str(REPO / "configs" / "ulma.yaml"), *tiny_overrides(tmp_path, steps=2)]
    args += ["--model.class_path", "my_research.MyULMA", "--trainer.limit_val_batches", "0"]
    run_cli(args, cwd=tmp_path, extra_path=tmp_path)
    assert (tmp_path / "calls.txt").read_text().split() == ["6", "6"]  # the override ran on each step
    (log_dir,) = (tmp_path / "ulma").glob("version_*")
    series = scalars(log_dir)
    assert series["train/custom_step"] == [42.0, 42.0]
    assert series["train/loss_step"] == pytest.approx([u + 1.0 for u in series["train/ulma_step"]])
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "my_research.MyULMA"
    assert saved["model"]["init_args"]["positive_term"] == "sft"  # the config's arguments still apply


NEEDS_REFERENCE = [
    "ulma",
    "ulma_continuous",
    "pointwise_dpo",
    "pointwise_dpo_continuous",
]  # DPO: test_modules_baselines.py


@pytest.mark.integration
@pytest.mark.parametrize("name", NEEDS_REFERENCE)
def test_reference_none_is_refused_when_the_method_needs_one(tmp_path: Path, name: str) -> None:
    config = REPO / "configs" / f"{name}.yaml"
    line = next(line for line in config.read_text().splitlines() if line.strip().startswith("reference:"))
    assert "none" not in line.split("#", 1)[1]  # the config lists only the modes that work
    with pytest.raises(
        ValueError, match=r"needs reference log-probs, but policy\.reference .* is 'none'; set it to copy"
    ):
        main(["fit", "--config", str(config), "--model.init_args.policy.reference", "none", *tiny_overrides(tmp_path)])


def test_help_lists_every_subcommand(tmp_path: Path) -> None:
    """``ulma --help`` shows LightningCLI's subcommands and each extra one (export, evaluate, ...) with its line."""
    text = " ".join(run_cli(["--help"], cwd=tmp_path).stdout.split())
    assert "{fit,validate,test,predict," in text
    assert {"export", "evaluate"} <= set(EXTRA_COMMANDS)
    for name, (_, description) in EXTRA_COMMANDS.items():
        assert f"{name} {description}" in text, name


@pytest.mark.integration
def test_precomputed_reference_runs_under_the_training_precision(tmp_path: Path) -> None:
    """DPO with ``bf16-mixed`` and lr 0: the precomputed reference equals the policy, so the loss is ln 2
    (it was off by 3e-4 when the reference was precomputed in float32, outside the step's autocast)."""
    args = ["fit", "--config", str(REPO / "configs" / "dpo.yaml"), *tiny_overrides(tmp_path, steps=1)]
    args += [
        "--data.init_args.train",
        "demo://pairwise?n=12",
        "--data.init_args.test",
        "null",
        "--trainer.precision",
        "bf16-mixed",
    ]
    args += [
        "--model.init_args.policy.reference",
        "precomputed",
        "--model.init_args.optimizer.lr",
        "0.0",
        "--model.init_args.beta",
        "1.0",
    ]
    cli = main([*args, f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}"])
    assert cli.trainer.global_step == 1 and cli.datamodule.has_column("train", "reference_chosen_logps")
    assert abs(float(cli.trainer.callback_metrics["train/loss_step"]) - math.log(2)) < 1e-6
