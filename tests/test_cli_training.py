"""Each baseline trains through the CLI (``python -m ulma_lightning.cli fit --config configs/X.yaml``).

One subprocess per method: the method's own config, with a tiny model, a small fixed subset, a
higher learning rate and ~24 steps; the first and last logged ``train/loss`` values (read back from
the TensorBoard event file) show the loss going down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_LLAMA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.integration  # every test here builds a Trainer

STEPS = 24
CASES = {
    # config: (learning rate, extra overrides)
    "sft": (5e-3, []),
    "dpo": (5e-3, []),
    "unlikelihood": (5e-3, []),
    "kto": (5e-3, []),
    "reward": (5e-3, []),
}


def run_cli(config: str, root: Path, lr: float, extra: list[str]) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "ulma_lightning.cli", "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
        f"--trainer.max_steps={STEPS}", "--trainer.max_epochs=1000", "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=1.0", "--trainer.check_val_every_n_epoch=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}", f"--model.init_args.optimizer.lr={lr}",
        "--model.init_args.optimizer.warmup_steps=0", "--model.init_args.optimizer.schedule=constant",
        "--data.init_args.max_samples=32", "--data.init_args.val_fraction=0.25", "--data.init_args.batch_size=8",
        "--data.init_args.max_length=64", *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }  # tiny models: one thread is fastest on busy cores
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def scalars(root: Path, tag: str) -> list[float]:
    files = sorted(root.rglob("events.out.tfevents*"))
    assert files, f"no TensorBoard event file under {root}"
    values = []
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values += [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
    return values


@pytest.mark.parametrize("config", list(CASES))
def test_cli_trains_with_loss_decreasing(config: str, tmp_path: Path) -> None:
    lr, extra = CASES[config]
    result = run_cli(config, tmp_path, lr, extra)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = scalars(tmp_path, "train/loss_step")
    assert len(losses) == STEPS, losses
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{config}: train/loss did not decrease: first steps {losses[:3]}, last steps {losses[-3:]}"
    assert scalars(tmp_path, "val/loss"), "validation did not run"
    exported = list(tmp_path.rglob("hf_model/config.json"))
    assert exported, "HFExport wrote no Hugging Face folder"
    if config == "reward":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(exported[0].parent)
        assert model.config.num_labels == 1
