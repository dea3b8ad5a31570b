"""RLHF speed: the library's RLOO step (time split generate / score / log-probs / reference / update,
generation tokens/s) beside TRL 1.16's ``RLOOTrainer`` on the same model, prompts and settings, in one run,
and the library's online ULMA step (``OnlineULMAModule``, the same rollout, k and reward) beside them.

``PYTHONPATH=. python -m benchmarks.bench_rlhf [--steps 8]`` prints a markdown table. Both sides: the
``configs/rloo.yaml`` model (random init, saved once to a folder both load), the demo tokenizer, 8
prompts x k=4 samples per step, 16 new tokens sampled at temperature 1, beta 0.01, one update per
generation, float32 on CPU, the demo task's ground truth as the reward. Each side runs one warm-up step
first, not timed. The two libraries' samples differ (their samplers differ), so their response lengths
differ too: the table shows the generated tokens each side produced.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ulma_lightning import OnlineULMAModule, PolicyConfig, PromptDataModule, RLOOModule
from ulma_lightning.data.demo import score_response
from ulma_lightning.data.formatting import format_prompt
from ulma_lightning.evaluation.generation import GenerationConfig
from ulma_lightning.modules.base import OptimizerConfig
from ulma_lightning.policy import Policy

MODEL = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}  # fmt: skip
PROMPTS, K, NEW_TOKENS, BETA, LR = 8, 4, 16, 0.01, 1e-5
SOURCE = "demo://demonstration?n=400"


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
        row = {name: float(metrics[f"train/time/{name}_step"]) for name in ("generate", "score", "logprobs", "reference", "update")}
        row["step"] = time.perf_counter() - self._start
        row["tokens"] = float(metrics["train/response_length_step"]) * PROMPTS * K
        self.rows.append(row)


def ours(folder: Path, steps: int, method: str = "rloo") -> dict[str, float]:
    """The mean time split of ``steps`` steps of ``method``: ``rloo`` or ``online_ulma`` (k=K, labels
    top vs rest, beta 1.0 per token)."""
    pl.seed_everything(0)
    common: dict[str, Any] = {"generation": GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=True)}
    policy, optimizer = PolicyConfig(model=str(folder), reference="copy"), OptimizerConfig(lr=LR, schedule="constant")
    if method == "rloo":
        module: pl.LightningModule = RLOOModule(policy, optimizer, rloo_k=K, kl_coef=BETA, **common)
    else:
        module = OnlineULMAModule(policy, optimizer, samples_per_prompt=K, **common)
    data = PromptDataModule(train=SOURCE, max_length=128, batch_size=PROMPTS)
    times = StepTimes()
    trainer = pl.Trainer(max_steps=steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[times])  # fmt: skip
    trainer.fit(module, data)
    rows = times.rows[1:]  # the first step warms up
    return {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}


def trl(folder: Path, steps: int) -> dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

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

    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-rloo-"), per_device_train_batch_size=PROMPTS * K, num_generations=K,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, learning_rate=LR, max_steps=steps + 1,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**9, gradient_checkpointing=False, bf16=False,
        seed=0,
    )  # fmt: skip
    times = Times()
    trainer = RLOOTrainer(model=str(folder), reward_funcs=ground_truth, args=args, train_dataset=Dataset.from_dict({"prompt": texts}),
                          processing_class=tokenizer, callbacks=[times])  # fmt: skip
    trainer.train()
    end = time.perf_counter()
    marks = times.starts + [end]
    per_step = [b - a for a, b in zip(marks[1:], marks[2:])]  # without the warm-up step
    return {"step": sum(per_step) / len(per_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (after one warm-up step)")
    options = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="bench-rlhf-model-"))
    save_model(folder)
    mine = ours(folder, options.steps)
    online = ours(folder, options.steps, "online_ulma")
    try:
        theirs: dict[str, float] | None = trl(folder, options.steps)
    except Exception as exc:  # report, do not hide: the table says TRL did not run and why
        print(f"TRL RLOOTrainer did not run: {type(exc).__name__}: {exc}")
        theirs = None
    print(f"| step, {PROMPTS} prompts x k={K}, {NEW_TOKENS} new tokens, CPU | seconds |")
    print("|---|---|")
    for name in ("generate", "score", "logprobs", "reference", "update", "step"):
        print(f"| ulma-lightning RLOO {name} | {mine[name]:.3f} |")
    print(f"| ulma-lightning generation tokens/s | {mine['tokens'] / mine['generate']:.0f} |")
    for name in ("generate", "score", "logprobs", "reference", "update", "step"):
        print(f"| ulma-lightning online ULMA {name} | {online[name]:.3f} |")
    if theirs is not None:
        print(f"| TRL 1.16 RLOOTrainer step | {theirs['step']:.3f} |")
        print(f"| ratio TRL / ulma-lightning (step time) | {theirs['step'] / mine['step']:.2f} |")


if __name__ == "__main__":
    main()
