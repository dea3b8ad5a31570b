"""Demonstration and pairwise data: demo sources, HH prompt checks, consistent pair truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl

from ulma_lightning import DataError, DemonstrationDataModule, PairwiseDataModule
from ulma_lightning.data.demo import generate_demonstrations, generate_pairs, score_response
from ulma_lightning.logprobs import IGNORE_INDEX

GOOD_HH = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then knead the dough.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: I'm sorry, but I can't help with that.",
}
MISMATCHED_HH = {
    "chosen": "\n\nHuman: How do I make tea?\n\nAssistant: Boil fresh water.",
    "rejected": "\n\nHuman: How do I steal a car?\n\nAssistant: I won't help with that.",
}


def test_demo_pairs_rank_chosen_above_rejected_and_are_seeded() -> None:
    pairs = generate_pairs(300, seed=4)
    assert pairs == generate_pairs(300, seed=4)
    assert pairs != generate_pairs(300, seed=5)
    for record in pairs:
        assert score_response(record["prompt"], record["chosen"]) == 1.0
        assert score_response(record["prompt"], record["rejected"]) < 1.0
    demos = generate_demonstrations(300, seed=4)
    assert [d["response"] for d in demos] == [p["chosen"] for p in pairs]


def test_hh_pair_with_different_prompts_stops_with_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_HH, MISMATCHED_HH, GOOD_HH])
    data = PairwiseDataModule(train=str(path))
    with pytest.raises(
        DataError, match=r"pairs\.jsonl:2: field 'rejected': chosen and rejected differ before the last assistant turn"
    ):
        data.setup("fit")


def test_hh_pair_with_different_prompts_is_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_HH, MISMATCHED_HH, GOOD_HH])
    data = PairwiseDataModule(train=str(path), on_bad_record="skip")
    with caplog.at_level("WARNING", logger="ulma_lightning.data"):
        data.setup("fit")
    assert len(data.datasets["train"]) == 2
    reason = "field 'rejected': chosen and rejected differ before the last assistant turn"
    assert data.skipped["train"].as_dict() == {reason: 1}
    assert "skipped 1 record(s)" in caplog.text and "pairs.jsonl:2" in caplog.text


def test_pairwise_batch_shares_prompt_and_truncates_both_sides_alike() -> None:
    # A long prompt (greeting turn) and answers of different lengths, cut to 40 tokens.
    data = PairwiseDataModule(train="demo://pairwise?n=64", batch_size=64, max_length=40, max_prompt_length=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    for key in (
        "chosen_input_ids",
        "chosen_attention_mask",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_attention_mask",
        "rejected_labels",
        "index",
    ):
        assert key in batch, key
    cut = 0
    for i in range(batch["index"].shape[0]):
        sides = []
        for prefix in ("chosen_", "rejected_"):
            ids, labels, mask = (
                batch[prefix + "input_ids"][i],
                batch[prefix + "labels"][i],
                batch[prefix + "attention_mask"][i],
            )
            length = int(mask.sum())
            assert length <= 40
            prompt_len = int((labels != IGNORE_INDEX).int().argmax())
            assert prompt_len > 0 and (labels[prompt_len:length] != IGNORE_INDEX).all()
            sides.append(ids[:prompt_len].tolist())
        assert sides[0] == sides[1], "chosen and rejected must share the same (truncated) prompt tokens"
        cut += int(max(batch["chosen_attention_mask"][i].sum(), batch["rejected_attention_mask"][i].sum()) == 40)
    assert cut > 0, "the test needs pairs that were truncated"


def test_demonstrations_from_hh_take_the_chosen_side(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "hh.jsonl", [GOOD_HH])
    data = DemonstrationDataModule(train=str(path))
    data.setup("fit")
    item = data.datasets["train"][0]
    response_ids = item["input_ids"][item["labels"] != IGNORE_INDEX]
    text = data.tokenizer.decode(response_ids)
    assert "knead the dough" in text and "sorry" not in text
    assert set(item) == {"input_ids", "labels", "length", "index"}


def test_demonstrations_min_score_keeps_positives_and_counts_the_rest() -> None:
    data = DemonstrationDataModule(train="demo://binary?n=50", min_score=1.0)
    data.setup("fit")
    from ulma_lightning.data.demo import generate_records

    positives = sum(r["score"] == 1.0 for r in generate_records(50, seed=0))
    assert len(data.datasets["train"]) == positives
    assert data.skipped["train"].as_dict() == {"score below min_score=1.0": 50 - positives}


def test_real_hh_mismatched_prompts_are_all_reported(hh_file: Path) -> None:
    """Every HH pair whose transcripts differ before the last assistant turn is counted, none silently kept."""
    import gzip

    from ulma_lightning.data.errors import SkipReport

    expected = 0
    with gzip.open(hh_file, "rt") as handle:
        for line in handle:
            record = json.loads(line)
            prompts = [record[k][: record[k].rfind("\n\nAssistant:")] for k in ("chosen", "rejected")]
            responses = [
                record[k][record[k].rfind("\n\nAssistant:") + len("\n\nAssistant:") :] for k in ("chosen", "rejected")
            ]
            expected += prompts[0] != prompts[1] and all(r.strip() for r in responses)
    data = PairwiseDataModule(train=str(hh_file), on_bad_record="skip")
    report = SkipReport("train")
    examples = data.read_examples(str(hh_file), "train", report)
    assert expected > 0
    assert report.as_dict()["field 'rejected': chosen and rejected differ before the last assistant turn"] == expected
    assert all(isinstance(e.prompt, str) and e.prompt.endswith("Assistant:") for e in examples)


def test_real_hh_pairs_load(hh_file: Path) -> None:
    data = PairwiseDataModule(train=str(hh_file), max_samples=64, max_length=256, on_bad_record="skip")
    data.setup("fit")
    assert len(data.datasets["train"]) == 64
    batch = next(iter(data.train_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 8
