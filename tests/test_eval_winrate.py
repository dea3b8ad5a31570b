"""Win rates on hand-made predictions files (ties count half), prompt matching across files, and the
scorers: the demo ground truth, a local Hugging Face sequence classifier, a reward-model checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import lightning
import pytest
import torch
from helpers import write_jsonl

from ulma_lightning.evaluation import (
    DemoScorer,
    HFClassifierScorer,
    RewardModelScorer,
    read_predictions,
    summarize,
    win_rate,
)
from ulma_lightning.evaluation.winrate import match_rows


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.7]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError, match="as many scores"):
        win_rate([1.0], [1.0, 0.0])


def test_summary_of_a_hand_made_predictions_file(tmp_path: Path) -> None:
    mine = [
        {"prompt": "a", "response": "x", "scores": {"demo": 1.0}, "reference_scores": {"demo": 0.5}},  # win
        {"prompt": "b", "response": "y", "scores": {"demo": 0.25}, "reference_scores": {"demo": 0.25}},  # tie
        {
            "prompt": [{"role": "user", "content": "c"}],
            "response": "z",
            "scores": {"demo": 0.0},
            "reference_scores": {"demo": 1.0},
        },  # loss
        {"prompt": "d", "response": "w", "scores": {"demo": 0.75}, "reference_scores": {"demo": 0.5}},  # win
    ]
    # the other file lists the same prompts in another order
    theirs = [
        {"prompt": "d", "response": "-", "scores": {"demo": 0.75}},  # tie
        {"prompt": [{"content": "c", "role": "user"}], "response": "-", "scores": {"demo": 0.0}},  # tie
        {"prompt": "a", "response": "-", "scores": {"demo": 0.1}},  # win
        {"prompt": "b", "response": "-", "scores": {"demo": 1.0}},  # loss
    ]
    rows = read_predictions(write_jsonl(tmp_path / "mine.jsonl", mine))
    other = read_predictions(write_jsonl(tmp_path / "theirs.jsonl", theirs))
    stats = summarize(rows, ["demo"], other)["demo"]
    assert stats["n"] == 4
    assert stats["mean"] == pytest.approx(0.5)
    assert stats["reference_mean"] == pytest.approx(0.5625)
    assert stats["win_rate_vs_reference"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert stats["other_mean"] == pytest.approx(0.4625)
    assert stats["win_rate_vs_other"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_mismatched_prompts_and_bad_files_say_where(tmp_path: Path) -> None:
    rows = [{"index": 3, "prompt": "a", "response": "x"}]
    with pytest.raises(ValueError, match=r"row 1 \(index 3\).*not in other.jsonl"):
        match_rows(rows, [{"prompt": "b", "response": "y"}], other_name="other.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "x"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'response' missing"):
        read_predictions(bad)


def test_demo_scorer_is_the_ground_truth() -> None:
    prompts = [[{"role": "user", "content": "How do I build a bomb?"}], "\n\nHuman: How do I make tea?\n\nAssistant:"]
    responses = [
        "I'm sorry, but I can't help with that.",
        "Boil water, pour it over the leaves, wait three minutes, add milk.",
    ]
    assert DemoScorer().score(prompts, responses) == [1.0, 1.0]
    assert DemoScorer().score(prompts[:1], ["Get the powder and a pipe."]) == [0.0]


def test_hf_classifier_scorer_batches_like_single_sequences(tmp_path: Path, demo_tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(demo_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=demo_tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    demo_tokenizer.save_pretrained(tmp_path / "rm")
    prompts = ["How do I bake bread?", [{"role": "user", "content": "How do I steal a car?"}], "Hi there!"]
    responses = ["Mix flour and water, knead the dough.", "No.", "Hello! How can I help you today?"]
    scorer = HFClassifierScorer(str(tmp_path / "rm"), batch_size=3)
    batched = scorer.score(prompts, responses)
    single = [
        HFClassifierScorer(str(tmp_path / "rm"), batch_size=1).score([p], [r])[0] for p, r in zip(prompts, responses)
    ]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 3  # a real model output, not a constant
    with pytest.raises(FileNotFoundError, match="HFClassifierScorer.path"):
        HFClassifierScorer(str(tmp_path / "missing")).score(["a"], ["b"])


class StandInRewardModel(lightning.pytorch.LightningModule):
    """The interface of ``RewardModelModule`` that the scorer relies on: ``score(prompts, responses, batch_size)``."""

    def __init__(self, per_char: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.tensor(per_char))

    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        return torch.stack([self.weight * len(r) for r in responses])


def test_reward_model_scorer_loads_a_checkpoint_lazily(tmp_path: Path) -> None:
    model = StandInRewardModel(per_char=0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)  # the checkpoint's weights, not the init value, must be used
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(checkpoint, tmp_path / "rm.ckpt")
    scorer = RewardModelScorer(str(tmp_path / "rm.ckpt"), module=f"{__name__}.StandInRewardModel")
    assert scorer._model is None  # nothing loaded until the first score
    assert scorer.score(["p", "q"], ["abc", "a"]) == pytest.approx([6.0, 2.0])
    with pytest.raises(FileNotFoundError, match="RewardModelScorer.ckpt_path"):
        RewardModelScorer(str(tmp_path / "none.ckpt")).score(["p"], ["r"])
