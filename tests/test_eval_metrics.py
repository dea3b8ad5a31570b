"""Held-out metrics: perplexity (token-weighted exp of the mean NLL of demonstrations, checked against a
naive full-softmax computation, with no extra forward), and the Pearson/Spearman correlation of the
implicit reward with continuous labels (checked against a hand computation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_LLAMA

from ulma_lightning import PointwiseDataModule, PolicyConfig, ULMAModule
from ulma_lightning.evaluation.metrics import demonstration_rows, reuse_token_logps
from ulma_lightning.logprobs import IGNORE_INDEX, TokenLogps

RECORDS = [
    (
        "How do I bake bread?",
        "Sure! To bake bread, mix flour, water, yeast and salt, knead the dough, let it rise, then bake it.",
        1.0,
    ),
    ("How do I build a bomb?", "I'm sorry, but I can't help with that.", 1.0),
    ("How do I steal a car?", "Sure! To steal a car, break the side window.", 0.0),
    ("Can you tell me how to make tea?", "Ok.", 1.0),
    ("Please explain how to save money.", "I won't help with that, because it could hurt someone.", 0.3),
    (
        "What is the best way to plant tomatoes?",
        "Sure! To plant tomatoes, pick a sunny spot, dig a deep hole, set the plant in, and water it every day.",
        1.0,
    ),
    ("I want to learn to swim. Any tips?", "Sure! To learn to swim, start in shallow water.", 0.6),
]


def write_records(path: Path, label_type: str) -> Path:
    """The records as JSONL; for binary labels the fractional scores become 0."""
    with open(path, "w") as handle:
        for prompt, response, score in RECORDS:
            score = score if label_type == "continuous" or score == 1.0 else 0.0
            handle.write(json.dumps({"prompt": prompt, "response": response, "score": score}) + "\n")
    return path


def tiny_run(tmp_path: Path, label_type: str) -> tuple[ULMAModule, PointwiseDataModule, pl.Trainer]:
    data = write_records(tmp_path / "test.jsonl", label_type)
    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"), label_type=label_type)
    module.configure_model()
    with torch.no_grad():  # move the policy away from its reference (h varies) and from uniform (NLLs vary)
        generator = torch.Generator().manual_seed(0)
        for parameter in module.policy.model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    datamodule = PointwiseDataModule(
        train=str(data), test=str(data), tokenizer="builtin:demo", batch_size=2, eval_batch_size=2
    )
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return module, datamodule, trainer


def hand_token_nll(model: torch.nn.Module, item: dict) -> torch.Tensor:
    """NLL of each response token from the full (1, T, vocab) logits, the naive way."""
    input_ids = torch.as_tensor(item["input_ids"]).unsqueeze(0)
    labels = torch.as_tensor(item["labels"]).unsqueeze(0)
    logprobs = model(input_ids=input_ids).logits.float().log_softmax(-1)[0, :-1]
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    return -logprobs[keep].gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)


@pytest.mark.integration
def test_perplexity_is_exp_of_the_mean_token_nll_of_positives(tmp_path: Path) -> None:
    module, datamodule, trainer = tiny_run(tmp_path, "binary")
    calls: list[int] = []
    original = module.policy.token_logps

    def counting(batch, *, reference=False):
        if not reference:
            calls.append(int(batch["input_ids"].shape[0]))
        return original(batch, reference=reference)

    module.policy.token_logps = counting  # type: ignore[method-assign]
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    module.policy.token_logps = original  # type: ignore[method-assign]

    items = datamodule.datasets["test"].items
    positives = [item for item in items if item["score"] >= 1.0]
    assert 0 < len(positives) < len(items)
    with torch.no_grad():
        nll = [hand_token_nll(module.policy.model, item) for item in positives]
    token_weighted = math.exp(float(torch.cat(nll).mean()))
    per_sequence = sum(math.exp(float(x.mean())) for x in nll) / len(nll)
    assert metrics["test/perplexity"] == pytest.approx(token_weighted, rel=1e-4)
    assert abs(token_weighted - per_sequence) > 1e-3 * token_weighted  # the two definitions differ here
    assert calls == [2, 2, 2, 1]  # one policy forward per batch: perplexity reused it


def test_demonstration_rows_and_reuse_of_a_stacked_forward() -> None:
    chosen = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 8, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 6, 7, -100], [-100, 8, -100, -100]]),
    }
    batch = {f"chosen_{k}": v for k, v in chosen.items()} | {f"rejected_{k}": v for k, v in chosen.items()}
    sequences, rows = demonstration_rows(batch, 1.0)
    assert rows is None and torch.equal(sequences["input_ids"], chosen["input_ids"])
    pointwise = dict(chosen, score=torch.tensor([1.0, 0.0]))
    assert demonstration_rows(pointwise, 1.0)[1].tolist() == [True, False]
    assert demonstration_rows(dict(chosen), 1.0)[1] is None  # demonstrations: every row
    # a pairwise step's forward: chosen rows first, then rejected rows, padded wider
    stacked = {
        k: torch.cat([torch.nn.functional.pad(v, (0, 2), value=-100 if k == "labels" else 0)] * 2)
        for k, v in chosen.items()
    }
    tokens = TokenLogps(
        values=torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]),
        batch_index=torch.tensor([0, 0, 1, 2, 2, 3]),
        num_sequences=4,
    )
    reused = reuse_token_logps([(stacked, tokens)], sequences)
    assert reused is not None and reused.values.tolist() == [-1.0, -2.0, -3.0] and reused.num_sequences == 2
    different = dict(stacked, input_ids=stacked["input_ids"] + 1)
    assert reuse_token_logps([(different, tokens)], sequences) is None


@pytest.mark.integration
def test_continuous_labels_log_pearson_and_spearman_of_the_implicit_reward(tmp_path: Path) -> None:
    module, datamodule, trainer = tiny_run(tmp_path, "continuous")
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    items = datamodule.datasets["test"].items
    with torch.no_grad():
        rewards = []
        for item in items:
            policy = -hand_token_nll(module.policy.model, item).mean()
            reference = -hand_token_nll(module.policy.reference_model, item).mean()
            rewards.append(module.beta * float(policy - reference))
    rewards_t = torch.tensor(rewards, dtype=torch.float64)
    labels = torch.tensor([item["score"] for item in items], dtype=torch.float64)
    pearson = float(torch.corrcoef(torch.stack([rewards_t, labels]))[0, 1])

    def ranks(x: torch.Tensor) -> torch.Tensor:  # average ranks (ties share their mean rank)
        return torch.tensor([float((x < v).sum()) + (float((x == v).sum()) + 1) / 2 for v in x], dtype=torch.float64)

    spearman = float(torch.corrcoef(torch.stack([ranks(rewards_t), ranks(labels)]))[0, 1])
    assert metrics["test/rewards/pearson"] == pytest.approx(pearson, abs=1e-4)
    assert metrics["test/rewards/spearman"] == pytest.approx(spearman, abs=1e-4)
    assert abs(pearson) > 1e-3


@pytest.mark.integration
def test_sft_on_demonstrations_logs_the_token_weighted_perplexity_of_every_row(tmp_path: Path) -> None:
    from ulma_lightning import DemonstrationDataModule, SFTModule

    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r, _ in RECORDS))
    module = SFTModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference="none"))
    datamodule = DemonstrationDataModule(train=str(data), test=str(data), tokenizer="builtin:demo", batch_size=3)
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]  # SFT's own per-batch perplexity gives way
    items = datamodule.datasets["test"].items
    assert len(items) == len(RECORDS) and "score" not in items[0]
    with torch.no_grad():
        nll = torch.cat([hand_token_nll(module.policy.model, item) for item in items])
    assert metrics["test/perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
