"""Helpers of the RL tests that run the shipped configs in process: small overrides, tiny model folders, scalars."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from conftest import REPO, TINY_LLAMA

from ulma_lightning import PromptDataModule
from ulma_lightning.evaluation import Scorer
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.policy import LoraSettings, PolicyConfig

GEN = GenerationConfig(max_new_tokens=6, do_sample=True)


def policy(reference: str = "copy", lora: bool = False) -> PolicyConfig:
    """The tiny demo model's policy settings (LoRA r 4 with ``lora``)."""
    return PolicyConfig(
        model_config=dict(TINY_LLAMA),
        tokenizer="builtin:demo",
        reference=reference,
        lora=LoraSettings(r=4) if lora else None,
    )


def prompts(n: int = 8, batch_size: int = 4) -> PromptDataModule:
    return PromptDataModule(
        train=f"demo://binary?n={n}", val="demo://binary?split=test&n=4", max_length=64, batch_size=batch_size
    )


def fit(
    module: pl.LightningModule, data: pl.LightningDataModule, steps: int = 1, limit_val_batches: int = 1, **kwargs: Any
) -> pl.Trainer:
    """``steps`` training steps of ``module`` in a quiet Trainer (no logger, checkpoints or sanity check)."""
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=limit_val_batches, **kwargs,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def small_run(root: Path, *, steps: int = 2, train: str = "demo://demonstration?n=24") -> list[str]:
    """Overrides that keep a shipped RL config to a few steps of the tiny model, writing under ``root``."""
    return [
        f"--model.init_args.policy.model_config={json.dumps(TINY_LLAMA)}",
        "--model.init_args.generation.max_new_tokens=4",
        f"--data.init_args.train={train}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        "--trainer.max_epochs=1", f"--trainer.limit_train_batches={steps}", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
    ]  # fmt: skip


def ulma_fit(config: str, args: list[str]) -> Any:
    """``ulma fit --config configs/<config>.yaml ARGS`` in process; returns the LightningCLI."""
    from ulma_lightning.cli import main

    argv = sys.argv
    sys.argv = ["ulma"]
    try:
        return main(["fit", "--config", str(REPO / "configs" / f"{config}.yaml"), *args])
    finally:
        sys.argv = argv


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = next(p.parent for p in log_dir.rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_causal_lm(folder: Path, **overrides: Any) -> Path:
    """A randomly initialised tiny Llama causal LM with the demo tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ulma_lightning.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("builtin:demo")
    options = {k: v for k, v in {**TINY_LLAMA, **overrides}.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "llama",
        **options,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_reward_model(folder: Path, **overrides: Any) -> Path:
    """A randomly initialised tiny Llama sequence classifier with one label (a reward model folder)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ulma_lightning.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("builtin:demo")
    options = {k: v for k, v in {**TINY_LLAMA, **overrides}.items() if k != "model_type"}
    config = AutoConfig.for_model(
        "llama", **options, vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class LengthScorer(Scorer):
    """A programmatic reward that varies within a group (any scorer works): the response's length in
    characters / 10 (the demo's ground truth is flat for a random model, so a step could leave every
    weight as it was)."""

    def score(self, prompts: Any, responses: Any) -> list[float]:
        return [len(r) / 10 for r in responses]


DDP_SCRIPT = """
import json, os, sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from rl_helpers import LengthScorer
from ulma_lightning import GRPOModule, OnlineULMAModule, PolicyConfig, PPOModule, PromptDataModule, RLOOModule
from ulma_lightning.callbacks import HFExport
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.sharding import FSDP2Strategy

OUT = Path(sys.argv[1])
RANK = int(os.environ.get("LOCAL_RANK", 0))  # the launcher sets it in the second process


def sums(model):
    # a DTensor (FSDP2) is gathered whole: a collective, so every rank walks the same parameters in the same order
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    return {k: float(full(v).double().sum()) for k, v in model.named_parameters()}


class Record(pl.Callback):
    def __init__(self, out):
        self.out, self.rows, self.start, self.losses = out, [], {}, []

    def on_train_start(self, trainer, module):
        self.start = {k: v for k, v in sums(module).items() if not k.startswith("policy.reference_model.")}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append(batch["index"].tolist())
        self.losses.append(float(trainer.callback_metrics["train/loss_step"]))

    def on_train_end(self, trainer, module):
        trained = {k for k, v in module.named_parameters() if v.requires_grad}
        weights = {k: v for k, v in sums(module).items() if k in trained}
        reference_model = module.policy.reference_model
        reference = sums(reference_model) if reference_model is not None else {}
        row = {"index": self.rows, "start": self.start, "weights": weights, "reference": reference,
               "losses": self.losses, "step": trainer.global_step, "strategy": type(trainer.strategy).__name__}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(row))


def train(out, checkpoints, resume=None):
    policy = PolicyConfig(model_config=%(tiny)s, tokenizer="builtin:demo", reference="copy")
    generation = GenerationConfig(max_new_tokens=5, do_sample=True)
    module = %(module)s
    data = PromptDataModule(train="demo://demonstration?n=16", batch_size=4, max_length=64)
    extra = [HFExport(str(out / "hf_model"))] if %(export)s else []
    if checkpoints:
        extra.append(
            pl.callbacks.ModelCheckpoint(out / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        )
    trainer = pl.Trainer(strategy=%(strategy)s, devices=2, accelerator="cpu", precision="32-true", max_epochs=1,
                         limit_train_batches=2, logger=False, enable_checkpointing=checkpoints,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record(out), *extra], default_root_dir=out)
    trainer.fit(module, datamodule=data, ckpt_path=resume)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(OUT, %(checkpoints)s)
    # the same processes (and process group) go on: a new module and Trainer resume the cut run
    if %(resume)r is not None:
        (OUT / "resumed").mkdir(exist_ok=True)
        train(OUT / "resumed", False, str(OUT / "checkpoints" / %(resume)r))
"""

STRATEGIES = {"ddp": '"ddp"', "fsdp2": "FSDP2Strategy()"}


def run_rl_ddp(
    folder: Path, module: str, *, strategy: str = "ddp", export: bool = False, checkpoints: bool = False
) -> list[dict[str, Any]]:
    """Train ``module`` (Python building an RL module from ``policy``, ``generation`` and a
    :class:`LengthScorer`; ``RANK`` is the process's rank) for 2 rollout batches of 4 demo prompts on
    2 CPU processes (gloo) under ``strategy`` (``ddp`` or ``fsdp2``:
    :class:`~ulma_lightning.sharding.FSDP2Strategy`, float32). With ``export``,
    :class:`~ulma_lightning.callbacks.HFExport` writes ``folder/hf_model``; with ``checkpoints``, a
    checkpoint at every optimiser step goes to ``folder/checkpoints/step=N.ckpt``. Per rank:
    the prompt indices of each batch, the loss of each step, the sums of the full trainable weights at
    the start (``start``) and the end (``weights``) and of the reference's weights, the global step and
    the strategy's class name."""
    return _launch(folder, module, strategy=strategy, export=export, checkpoints=checkpoints)


def run_rl_ddp_and_resume(
    folder: Path, module: str, cut: str, *, strategy: str = "ddp"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`run_rl_ddp` with a checkpoint at every step, then, in the same 2 processes (one launch:
    the Python start-up is most of a tiny run's time), a new module and Trainer resumed from
    ``folder/checkpoints/<cut>`` to the end, writing under ``folder/resumed``: ``(whole, resumed)``."""
    whole = _launch(folder, module, strategy=strategy, checkpoints=True, resume=cut)
    return whole, [json.loads((folder / "resumed" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _launch(
    folder: Path,
    module: str,
    *,
    strategy: str,
    export: bool = False,
    checkpoints: bool = False,
    resume: str | None = None,
) -> list[dict[str, Any]]:
    import subprocess

    script = folder / "rl_ddp.py"
    options = {"strategy": STRATEGIES[strategy], "export": export, "checkpoints": checkpoints, "resume": resume}
    script.write_text(DDP_SCRIPT % {"tiny": repr(TINY_LLAMA), "module": module, **options})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    if (
        resume is not None
    ):  # our own checkpoint, whose hparams are config objects; Lightning 2.6 drops fit's weights_only under FSDP2
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    # its own process group: on a timeout the second rank, which Lightning started, is killed too
    process = subprocess.Popen(
        [sys.executable, str(script), str(folder)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-4000:]
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
