"""The library's modules on bench-A: their own ``training_step``, then backward and an optimizer step.

Each row builds the module as a user's config would (``ULMAModule(policy=PolicyConfig(...))``), calls
``configure_model()`` (which builds the policy and its reference), and per step runs
``module.training_step(batch, i)`` (under ``torch.autocast(bfloat16)`` in the bf16 rows, as
Lightning's ``bf16-mixed`` precision does), ``loss.backward()``, ``optimizer.step()`` and
``optimizer.zero_grad()``, the order Lightning's automatic optimisation uses. With a precomputed
reference, each batch's reference log-probs come from the policy's own reference forward before
timing, exactly what ``AlignmentModule.precompute_reference_logps`` stores, and the reference model is
then freed as that method does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from benchmarks.workload import BATCH_SIZE, Sample, model_config


def module_class(method: str) -> type:
    import ulma_lightning

    names = {
        "ulma": "ULMAModule",
        "pointwise_dpo": "PointwiseDPOModule",
        "dpo": "DPOModule",
        "sft": "SFTModule",
        "kto": "KTOModule",
    }
    cls = getattr(ulma_lightning, names[method], None)
    if cls is None:
        raise ImportError(f"ulma_lightning has no {names[method]} yet (the baselines are not merged)")
    return cls


def data_kind(method: str) -> str:
    return {"dpo": "pairwise", "sft": "sft"}.get(method, "pointwise")


class OurRow:
    """One of the library's modules on bench-A batches.

    Args:
        method: ``ulma``, ``pointwise_dpo``, ``dpo``, ``sft`` or ``kto``.
        reference: ``copy`` or ``precomputed`` (ignored by SFT, which has none).
        bf16: run the step under bf16 autocast.
        tokenizer: the bench-A tokenizer folder.
        model_overrides: changes to the bench-A model config (the scaling run's vocabulary).
        chunk_size: response tokens per vocabulary-projection chunk (``PolicyConfig.logits_chunk_size``).
        compile: ``PolicyConfig.compile`` (the transformer blocks through ``torch.compile``).
    """

    def __init__(
        self,
        method: str,
        reference: str,
        bf16: bool,
        tokenizer: str,
        model_overrides: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        from ulma_lightning import PolicyConfig

        self.method = method
        self.bf16 = bf16
        ref = "none" if method == "sft" else reference
        options: dict[str, Any] = {
            "model_config": model_config(**(model_overrides or {})),
            "tokenizer": tokenizer,
            "reference": ref,
        }
        if chunk_size is not None:
            options["logits_chunk_size"] = chunk_size
        if compile:
            options["compile"] = compile
        self.module = module_class(method)(policy=PolicyConfig(**options))
        self.module.configure_model()
        self.module.train()
        self.precomputed = ref == "precomputed"
        self.optimizer = self.module.build_optimizer()  # the module's own AdamW (lr 1e-5 by default)

    @property
    def model(self) -> torch.nn.Module:
        return self.module.policy.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    # ------------------------------------------------------------ batches
    def collate(self, samples: list[Any]) -> list[dict[str, torch.Tensor]]:
        """Bench samples -> the library's padded batches (its ``PaddingCollator``), one per step."""
        from ulma_lightning.data.collate import PaddingCollator
        from ulma_lightning.data.features import build_sequence
        from ulma_lightning.tokenizers import pad_token_id

        collator = PaddingCollator(pad_token_id(self.module.tokenizer))

        def feature(s: Sample, index: int, prefix: str = "") -> dict[str, Any]:
            ids, labels = build_sequence(s.prompt_ids, s.response_ids)  # the library's prompt masking
            return {f"{prefix}input_ids": ids, f"{prefix}labels": labels}

        if self.method == "dpo":
            items = [
                {**feature(c, i, "chosen_"), **feature(r, i, "rejected_"), "index": i}
                for i, (c, r) in enumerate(samples)
            ]
            per_step = BATCH_SIZE // 2
        else:
            items = [{**feature(s, i), "score": s.score, "index": i} for i, s in enumerate(samples)]
            per_step = BATCH_SIZE
        batches = [collator(items[i : i + per_step]) for i in range(0, len(items), per_step)]
        if self.precomputed:
            self._precompute(batches)
        return batches

    def _precompute(self, batches: list[dict[str, torch.Tensor]]) -> None:
        module = self.module
        if self.method == "kto":
            raise NotImplementedError(
                "KTOModule's precomputed mode pairs samples through its data module; not a bench-A row"
            )
        with torch.no_grad(), self.autocast():  # the precision of the step, as precompute_reference_logps runs
            for batch in batches:
                batch.update(module.reference_columns(batch, "train"))
        module.policy.reference_model = None  # as precompute_reference_logps does

    # ------------------------------------------------------------ step
    def step(self, batch: dict[str, torch.Tensor], index: int) -> float:
        with self.autocast():
            loss = self.module.training_step(batch, index)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def useful_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-pad tokens of the training sequences."""
        return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))
