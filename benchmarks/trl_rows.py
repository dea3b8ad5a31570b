"""TRL's trainers on bench-A: their own collators, ``training_step`` and ``compute_loss``.

Each trainer is built as a user would (``KTOTrainer(model, ref_model, args, train_dataset,
processing_class)``), then driven step by step the way ``Trainer``'s loop does it: the model and
optimizer go through ``accelerator.prepare`` (which adds bf16 autocast to the forward), then per
step ``trainer.training_step(model, batch)`` (forward, loss, backward), ``optimizer.step()``,
``model.zero_grad()``. The batches are built by TRL's own collators from the bench-A token ids, so
both libraries see the same tokens in the same batches. The small text ``train_dataset`` passed to
the constructor only satisfies its checks; it is never trained on.

Settings that differ from TRL's defaults, to match bench-A and the library's rows: no gradient
checkpointing (TRL turns it on by default; neither side uses it here), no gradient clipping (the
library's default), bf16 only in the bf16 rows. Each side keeps its own optimizer: TRL's default
fused AdamW and the library's ``AlignmentModule.build_optimizer`` (also fused AdamW), both lr 1e-5.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch

from benchmarks.workload import BATCH_SIZE, LR, MAX_LENGTH, SEED, Sample


def _common_args(bf16: bool, max_length: int = MAX_LENGTH, gradient_checkpointing: bool = False) -> dict[str, Any]:
    return {
        "output_dir": tempfile.mkdtemp(prefix="bench-trl-"),
        "per_device_train_batch_size": BATCH_SIZE,
        "learning_rate": LR,
        "max_length": max_length,
        "gradient_checkpointing": gradient_checkpointing,
        "max_grad_norm": 0.0,
        "bf16": bf16,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10**9,
        "disable_tqdm": True,
        "seed": SEED,
        "dataloader_num_workers": 0,
    }


def _placeholder(kind: str) -> Any:
    """A tiny text dataset for the trainer's constructor (never trained on)."""
    from datasets import Dataset

    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(BATCH_SIZE)]
    answers = [f" answer {i}." for i in range(BATCH_SIZE)]
    if kind == "kto":
        return Dataset.from_dict(
            {"prompt": prompts, "completion": answers, "label": [i % 2 == 0 for i in range(BATCH_SIZE)]}
        )
    if kind == "dpo":
        return Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": answers[::-1]})
    return Dataset.from_dict({"prompt": prompts, "completion": answers})


def kto_examples(samples: list[Sample]) -> list[dict[str, Any]]:
    """TRL's unpaired examples, with its KL completions: rotated by one within each batch."""
    out = []
    for start in range(0, len(samples), BATCH_SIZE):
        chunk = samples[start : start + BATCH_SIZE]
        completions = [s.response_ids for s in chunk]
        rotated = [completions[-1]] + completions[:-1]
        for s, kl in zip(chunk, rotated):
            out.append(
                {
                    "prompt_ids": s.prompt_ids,
                    "completion_ids": s.response_ids,
                    "KL_completion_ids": kl,
                    "label": s.score >= 1.0,
                }
            )
    return out


class TRLRow:
    """One TRL trainer on bench-A batches.

    Args:
        method: ``kto``, ``dpo`` or ``sft``.
        reference: ``copy`` (a frozen reference model) or ``precomputed`` (TRL's
            ``precompute_ref_log_probs``; the reference log-probs of the bench batches are computed
            by TRL's ``compute_ref_log_probs`` before timing, with the initial policy, as TRL does).
        bf16: bf16 mixed precision (TRL's ``bf16=True``).
        model: the initial policy (the bench-A init).
        tokenizer: the bench-A tokenizer.
        max_length: TRL's ``max_length`` (bench-B: 1024).
        gradient_checkpointing: turn it on in the model (as ``Trainer.train`` would) and the config (bench-B).
        peft_config: a peft ``LoraConfig`` (KTO only, bench-C): TRL wraps the model in adapters and its
            reference is the model with the adapters disabled (no reference copy).
    """

    def __init__(
        self,
        method: str,
        reference: str,
        bf16: bool,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int = MAX_LENGTH,
        gradient_checkpointing: bool = False,
        peft_config: Any = None,
    ) -> None:
        from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

        self.method = method
        args = _common_args(bf16, max_length, gradient_checkpointing)
        if gradient_checkpointing:  # Trainer.train() does this; the rows step without train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        precompute = reference == "precomputed"
        if peft_config is not None and method != "kto":
            raise ValueError("peft_config: only the KTO row takes LoRA adapters")
        ref_model = (
            None
            if precompute or method == "sft" or peft_config is not None
            else copy.deepcopy(model).eval().requires_grad_(False)
        )
        if method == "kto":
            config = KTOConfig(**args, precompute_ref_log_probs=precompute)
            self.trainer = KTOTrainer(
                model=model,
                ref_model=ref_model,
                args=config,
                train_dataset=_placeholder("kto"),
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        elif method == "dpo":
            config = DPOConfig(**args, precompute_ref_log_probs=precompute)
            self.trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=config,
                train_dataset=_placeholder("dpo"),
                processing_class=tokenizer,
            )
        elif method == "sft":
            config = SFTConfig(**args)
            self.trainer = SFTTrainer(
                model=model, args=config, train_dataset=_placeholder("sft"), processing_class=tokenizer
            )
        else:
            raise ValueError(f"unknown TRL method {method!r}")
        self.precompute = precompute
        trainer = self.trainer
        trainer.create_optimizer()  # TRL's default: fused AdamW (torch >= 2.8), lr 1e-5, no weight decay
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        trainer.current_gradient_accumulation_steps = 1

    def collate(self, samples: list[Any]) -> list[dict[str, Any]]:
        """Bench samples -> TRL batches (its own collator), one per step."""
        collator = self.trainer.data_collator
        if self.method == "kto":
            examples = kto_examples(samples)
        elif self.method == "dpo":
            examples = [
                {"prompt_ids": c.prompt_ids, "chosen_ids": c.response_ids, "rejected_ids": r.response_ids}
                for c, r in samples
            ]
        else:
            examples = [
                {"input_ids": s.prompt_ids + s.response_ids, "labels": [-100] * len(s.prompt_ids) + s.response_ids}
                for s in samples
            ]
        per_step = BATCH_SIZE // 2 if self.method == "dpo" else BATCH_SIZE
        batches = [collator(examples[i : i + per_step]) for i in range(0, len(examples), per_step)]
        if self.precompute:
            for batch in batches:
                self._attach_reference(batch)
        return batches

    def _attach_reference(self, batch: dict[str, Any]) -> None:
        trainer = self.trainer
        model = trainer.ref_model or trainer.model
        if self.method == "kto":
            ref, ref_kl = trainer.compute_ref_log_probs(model, batch)
            batch["ref_logps"], batch["ref_KL_logps"] = ref, ref_kl
        else:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = trainer.compute_ref_log_probs(model, batch)

    def step(self, batch: dict[str, Any]) -> float:
        trainer = self.trainer
        loss = trainer.training_step(self.model, batch)
        trainer.optimizer.step()
        self.model.zero_grad()
        return float(loss)

    @staticmethod
    def useful_tokens(batch: dict[str, Any]) -> int:
        """Non-pad tokens of the training sequences (KTO's KL sequences excluded)."""
        return int(batch["attention_mask"].sum())
