"""RLHF speed: the library's RLOO or GRPO step (time split generate / score / log-probs / reference /
update, generation tokens/s) beside TRL 1.16's ``RLOOTrainer`` or ``GRPOTrainer`` on the same model,
prompts and settings, each side at its best memory allocator; and the library's online ULMA step
(``--method online_ulma``: ``OnlineULMAModule``, the same rollout, k and reward; TRL has no peer).
``--label_mode threshold`` keeps every sample in online ULMA's update (``top_vs_rest``, the default,
leaves out the prompts whose k rewards tie, which for this random model is most of them): the update
then runs on as many sequences as RLOO's, a like-for-like comparison of the two updates.

``PYTHONPATH=. python -m benchmarks.bench_rlhf [--method rloo|grpo|online_ulma] [--label_mode top_vs_rest|threshold]
[--steps 8] [--allocator both]`` prints a markdown table. Both sides: the ``configs/rloo.yaml`` model (random init,
saved once to a folder both load), the demo tokenizer, 8 prompts x k=4 samples per step, 16 new tokens sampled at
temperature 1, beta 0.01 (GRPO: the k3 penalty in the loss, ``loss_type: grpo``, ``scale_rewards:
group`` on both sides), one update per generation, float32 on CPU, the demo task's ground truth as the
reward. Each side runs in its own process once per allocator setting (:mod:`benchmarks.allocator`:
glibc's, and jemalloc where installed) and the faster setting is reported. Each run takes one warm-up
step first, not timed. The two libraries' samples differ (their samplers differ), so their response
lengths differ too: the table shows the generated tokens each side produced.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks import allocator
from ulma_lightning import GRPOModule, OnlineULMAModule, PolicyConfig, PromptDataModule, RLOOModule
from ulma_lightning.data.demo import score_response
from ulma_lightning.data.formatting import format_prompt
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.modules.base import OptimizerConfig
from ulma_lightning.policy import Policy

MODEL = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
         "tie_word_embeddings": True}  # fmt: skip
PROMPTS, K, NEW_TOKENS, BETA, LR = 8, 4, 16, 0.01, 1e-5
SOURCE = "demo://demonstration?n=400"
METHODS: dict[str, str | None] = {
    "rloo": "RLOOTrainer",
    "grpo": "GRPOTrainer",
    "online_ulma": None,
}  # the TRL peer, if any


def save_model(folder: Path) -> None:
    policy = Policy(PolicyConfig(model_config=MODEL, tokenizer="builtin:demo", reference="none"))
    policy.build()
    policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        row = {
            name: float(metrics[f"train/time/{name}_step"])
            for name in ("generate", "score", "logprobs", "reference", "update")
        }
        row["step"] = time.perf_counter() - self._start
        row["tokens"] = float(metrics["train/response_length_step"]) * PROMPTS * K
        if "train/kept_fraction_step" in metrics:  # online ULMA: the share of samples its update ran on
            row["kept_fraction"] = float(metrics["train/kept_fraction_step"])
        self.rows.append(row)


def ours(folder: Path, steps: int, method: str = "rloo", label_mode: str = "top_vs_rest") -> dict[str, float]:
    pl.seed_everything(0)
    common: dict[str, Any] = {"generation": GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True)}
    policy, optimizer = PolicyConfig(model=str(folder), reference="copy"), OptimizerConfig(lr=LR, schedule="constant")
    module: pl.LightningModule
    if method == "grpo":
        module = GRPOModule(
            policy, optimizer, num_generations=K, beta=BETA, loss_type="grpo", scale_rewards="group", **common
        )
    elif (
        method == "online_ulma"
    ):  # labels top vs rest among the k samples (or by threshold 0.5: every row kept), beta 1.0 per token
        module = OnlineULMAModule(policy, optimizer, samples_per_prompt=K, label_mode=label_mode, **common)  # type: ignore[arg-type]
    else:
        module = RLOOModule(policy, optimizer, rloo_k=K, kl_coef=BETA, **common)
    data = PromptDataModule(train=SOURCE, max_length=128, batch_size=PROMPTS)
    times = StepTimes()
    trainer = pl.Trainer(max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[times])  # fmt: skip
    trainer.fit(module, data)
    rows = times.rows[1:]  # the first step warms up
    return {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}


def trl(folder: Path, steps: int, method: str = "rloo") -> dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    data = PromptDataModule(train=SOURCE, max_length=128, batch_size=PROMPTS, tokenizer=str(folder))
    data.setup("fit")
    tokenizer = data.tokenizer
    texts = [format_prompt(e.prompt, tokenizer) for e in data.examples["train"]]
    originals = {text: e.prompt for text, e in zip(texts, data.examples["train"])}

    def ground_truth(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [score_response(originals.get(p, p), c) for p, c in zip(prompts, completions)]

    class Times(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.starts.append(time.perf_counter())

    options: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{method}-"), per_device_train_batch_size=PROMPTS * K,
        num_generations=K, max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, learning_rate=LR,
        max_steps=steps + 1, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**9,
        gradient_checkpointing=False, bf16=False, seed=0,
    )  # fmt: skip
    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if method == "grpo" else (RLOOConfig, RLOOTrainer)
    if method == "grpo":
        options.update(loss_type="grpo", scale_rewards="group")
    times = Times()
    trainer = trainer_class(model=str(folder), reward_funcs=ground_truth, args=config_class(**options),
                            train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                            callbacks=[times])  # fmt: skip
    trainer.train()
    end = time.perf_counter()
    marks = times.starts + [end]
    per_step = [b - a for a, b in zip(marks[1:], marks[2:])]  # without the warm-up step
    return {"step": sum(per_step) / len(per_step)}


def run_side(side: str, folder: Path, steps: int, method: str, label_mode: str = "top_vs_rest") -> dict[str, Any]:
    """One side's mean step times in this process, with the allocator it ran with."""
    result: dict[str, Any] = ours(folder, steps, method, label_mode) if side == "ours" else trl(folder, steps, method)
    return {**result, "allocator": allocator.loaded()}


def in_process(
    side: str, folder: Path, steps: int, method: str, setting: str, path: str | None, label_mode: str = "top_vs_rest"
) -> dict[str, Any]:
    """:func:`run_side` in a fresh process started with allocator ``setting`` (it reads LD_PRELOAD at start)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_rlhf",
        "--side",
        side,
        "--model",
        str(folder),
        "--steps",
        str(steps),
        "--method",
        method,
    ]
    if method == "online_ulma":
        command += ["--label_mode", label_mode]
    env = allocator.environment(setting, path, os.environ)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} under {setting} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the shortest step time (its allocator named in it)."""
    return min(runs, key=lambda r: r["step"])


def table(method: str, mine: dict[str, Any], theirs: dict[str, Any] | None) -> list[str]:
    """The markdown rows of the report."""
    lines = [
        f"| {method.upper()} step, {PROMPTS} prompts x k={K}, {NEW_TOKENS} new tokens, CPU | seconds |",
        "|---|---|",
    ]
    for name in ("generate", "score", "logprobs", "reference", "update", "step"):
        lines.append(f"| ulma-lightning {name} | {mine[name]:.3f} |")
    lines.append(f"| ulma-lightning generation tokens/s | {mine['tokens'] / mine['generate']:.0f} |")
    if "kept_fraction" in mine:
        lines.append(f"| ulma-lightning samples in the update (kept fraction) | {mine['kept_fraction']:.2f} |")
    lines.append(f"| ulma-lightning allocator | {mine['allocator']} |")
    if theirs is not None:
        lines.append(f"| TRL 1.16 {METHODS[method]} step | {theirs['step']:.3f} |")
        lines.append(f"| TRL allocator | {theirs['allocator']} |")
        lines.append(f"| ratio TRL / ulma-lightning (step time) | {theirs['step'] / mine['step']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--method", choices=sorted(METHODS), default="rloo", help="the method timed on both sides")
    parser.add_argument(
        "--allocator",
        choices=allocator.CHOICES,
        default="both",
        help="allocator settings tried per side; the best is reported",
    )
    parser.add_argument(
        "--label_mode", choices=("top_vs_rest", "threshold"), default="top_vs_rest",
        help="online ULMA's labels: threshold keeps every sample in the update (as many sequences as RLOO's)",
    )  # fmt: skip
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one side in this process (a child)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    options = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    if options.side:
        print(
            json.dumps(run_side(options.side, Path(options.model), options.steps, options.method, options.label_mode))
        )
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-rlhf-model-"))
    save_model(folder)
    path = allocator.find_jemalloc()
    settings, note = allocator.resolve(options.allocator, path)
    if note:
        print(note)
    mine = best(
        [in_process("ours", folder, options.steps, options.method, s, path, options.label_mode) for s in settings]
    )
    if METHODS[options.method] is None:
        print(
            f"TRL has no {options.method} trainer: compare its update with --method rloo's (same rollout, k and reward)"
        )
        print("\n".join(table(options.method, mine, None)))
        return
    try:
        theirs: dict[str, Any] | None = best(
            [in_process("trl", folder, options.steps, options.method, s, path) for s in settings]
        )
    except Exception as exc:  # report, do not hide: the table says TRL did not run and why
        print(f"TRL {METHODS[options.method]} did not run: {type(exc).__name__}: {exc}")
        theirs = None
    print("\n".join(table(options.method, mine, theirs)))


if __name__ == "__main__":
    main()
