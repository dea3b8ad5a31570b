"""The numbers of one trained model on held-out data, for ``ulma compare``.

On the grid's test prompts (``evaluation.prompts``):

* ``score``: mean ground-truth score (``evaluation.scorer``) of greedy generations, and, when
  ``evaluation.request_kind`` is set, ``score_harmless`` (helpfulness: the mean over harmless
  requests) and ``score_harmful`` (harmlessness: the mean over harmful requests);
* ``kl``: KL(policy || reference) estimated from one sampled response per prompt (temperature 1,
  no top-k/top-p), as the mean over prompts of the summed token log-ratio
  ``log pi(y|x) - log pi_ref(y|x)``; the reference is the run's own: the model its last stage
  started from (the base or untrained model for one-step rows, the SFT model for SFT then DPO);

and ``golden_ppl``: the token-weighted perplexity of held-out golden demonstrations
(``evaluation.golden``). Win rates against the baseline row and the untrained model are computed
from the saved per-prompt scores when the results are written (:mod:`ulma_lightning.compare.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ulma_lightning.compare.spec import EvaluationSpec
from ulma_lightning.data.collate import PaddingCollator
from ulma_lightning.data.demonstration import DemonstrationDataModule
from ulma_lightning.data.features import build_sequence
from ulma_lightning.data.prompts import LeftPaddingCollator
from ulma_lightning.evaluation.generation import GenerationConfig, generate_responses
from ulma_lightning.importing import import_object
from ulma_lightning.logprobs import response_token_logps
from ulma_lightning.tokenizers import load_tokenizer

PREDICTIONS_FILE = "predictions.jsonl"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(folder: str) -> torch.nn.Module:
    """A causal LM exported by ``ulma fit`` (``hf_model``), in eval mode, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).to(_device()).eval()


def _function(dotted: str) -> Callable[[Any], str]:
    return import_object(dotted)


def make_scorer(spec: dict[str, Any]) -> Any:
    """The scorer ``{class_path, init_args}`` of the evaluation section."""
    from lightning.pytorch.cli import instantiate_class

    return instantiate_class((), {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})})


class Evaluator:
    """Evaluates exported models on the grid's held-out data (prompts and demonstrations are read
    once, for the first model's tokenizer, and reused).

    Args:
        spec: the grid's ``evaluation`` section.
        seed: seed of the sampled responses of the KL estimate.
    """

    def __init__(self, spec: EvaluationSpec, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed
        self.scorer = make_scorer(spec.scorer)
        self.request_kind = _function(spec.request_kind) if spec.request_kind else None
        self._data: dict[tuple[str, str], Any] = {}

    def _datamodule(self, tokenizer_dir: str, split: str, source: str) -> DemonstrationDataModule:
        """The held-out data of ``split``, tokenized once per distinct tokenizer (exports of one grid share theirs)."""
        key = (_tokenizer_digest(tokenizer_dir), split)
        if key not in self._data:
            sources: dict[str, Any] = {split: source}
            dm = DemonstrationDataModule(
                **sources,
                tokenizer=tokenizer_dir,
                max_length=self.spec.max_length,
                eval_batch_size=self.spec.batch_size,
            )
            dm.setup(split)
            self._data[key] = dm
        return self._data[key]

    def prompts(self, tokenizer_dir: str) -> list[dict[str, Any]]:
        dm = self._datamodule(tokenizer_dir, "predict", self.spec.prompts)
        dataset = dm.datasets["predict"]
        items = [dataset[i] for i in range(len(dataset))]
        return items[: self.spec.max_prompts] if self.spec.max_prompts else items

    def evaluate(self, model_dir: str, reference_dir: str | None, out_dir: Path) -> dict[str, float]:
        """Metrics of the model in ``model_dir``; writes ``predictions.jsonl`` (prompt, response,
        score, kind) to ``out_dir``."""
        model = load_model(model_dir)
        tokenizer = load_tokenizer(model_dir)
        dm = self._datamodule(model_dir, "predict", self.spec.prompts)
        items = self.prompts(model_dir)
        collate = dm.prompt_collator
        generation = GenerationConfig(**{**self.spec.generation, "do_sample": False})
        responses: list[str] = []
        for start in range(0, len(items), self.spec.batch_size):
            batch = collate(items[start : start + self.spec.batch_size])
            responses += generate_responses(
                model,
                tokenizer,
                batch["input_ids"].to(model.device),
                batch["attention_mask"].to(model.device),
                generation,
            )
        prompts = [item["prompt"] for item in items]
        scores = [float(s) for s in self.scorer.to(model.device).score(prompts, responses)]
        kinds = [self.request_kind(p) for p in prompts] if self.request_kind else [None] * len(prompts)
        metrics: dict[str, float] = {"score": _mean(scores), "num_prompts": float(len(prompts))}
        if self.request_kind:
            for group in ("harmless", "harmful"):
                metrics[f"score_{group}"] = _mean([s for s, k in zip(scores, kinds) if k == group])
        if self.spec.golden:
            metrics["golden_ppl"] = self.perplexity(model, model_dir)
        if self.spec.kl_max_new_tokens > 0 and reference_dir is not None:
            metrics["kl"] = (
                0.0
                if Path(reference_dir) == Path(model_dir)
                else self.kl(model, load_model(reference_dir), tokenizer, items)
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
            for prompt, response, score, kind in zip(prompts, responses, scores, kinds):
                handle.write(
                    json.dumps(
                        {"prompt": prompt, "response": response, "score": score, "kind": kind}, ensure_ascii=False
                    )
                    + "\n"
                )
        return metrics

    @torch.no_grad()
    def perplexity(self, model: torch.nn.Module, model_dir: str) -> float:
        """Token-weighted perplexity of the golden demonstrations' response tokens."""
        assert self.spec.golden is not None
        dm = self._datamodule(model_dir, "test", self.spec.golden)
        nll, tokens = 0.0, 0
        for batch in dm.test_dataloader():
            logps = response_token_logps(
                model,
                batch["input_ids"].to(model.device),
                batch["attention_mask"].to(model.device),
                batch["labels"].to(model.device),
            )
            nll -= float(logps.values.double().sum())
            tokens += int(logps.values.numel())
        return math.exp(nll / tokens) if tokens else math.nan

    @torch.no_grad()
    def kl(
        self, model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, items: list[dict[str, Any]]
    ) -> float:
        """Mean over prompts of ``log pi(y|x) - log pi_ref(y|x)`` summed over a sampled response."""
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        collate_prompts = LeftPaddingCollator(pad)
        collate = PaddingCollator(pad)
        total, count = 0.0, 0
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            for start in range(0, len(items), self.spec.batch_size):
                part = items[start : start + self.spec.batch_size]
                prompt_batch = collate_prompts(part)
                ids, mask = prompt_batch["input_ids"], prompt_batch["attention_mask"]
                out = model.generate(
                    input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=self.spec.kl_max_new_tokens,
                    pad_token_id=pad, eos_token_id=eos,
                )  # fmt: skip
                rows = []
                for item, new in zip(part, out[:, ids.shape[1] :].tolist()):
                    response = new[: new.index(eos) + 1] if eos in new else new
                    input_ids, labels = build_sequence(list(item["input_ids"]), response)
                    rows.append({"input_ids": input_ids, "labels": labels})
                batch = {
                    k: v.to(model.device)
                    for k, v in collate(rows).items()
                    if k in ("input_ids", "attention_mask", "labels")
                }
                mine = response_token_logps(
                    model, batch["input_ids"], batch["attention_mask"], batch["labels"]
                ).per_sequence(False)
                theirs = response_token_logps(
                    reference, batch["input_ids"], batch["attention_mask"], batch["labels"]
                ).per_sequence(False)
                total += float((mine - theirs).double().sum())
                count += len(part)
        finally:
            torch.random.set_rng_state(generator_state)
        return total / count if count else math.nan


def _tokenizer_digest(folder: str) -> str:
    """A digest of the tokenizer files of an exported folder."""
    digest = hashlib.sha1()
    for path in sorted(Path(folder).iterdir()):
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in ("config.json", "generation_config.json")
        ):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
