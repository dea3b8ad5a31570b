"""The point-wise pipeline on the real Anthropic HH file (../shared/data/hh-rlhf, skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ulma_lightning import DataError, PointwiseDataModule
from ulma_lightning.data.errors import SkipReport
from ulma_lightning.data.records import ASSISTANT_MARKER
from ulma_lightning.logprobs import IGNORE_INDEX

N_RECORDS = 2312
# Four transcripts end with an empty final "Assistant:" turn on the chosen side (lines 87, 517, 926
# and 1104): an empty response is a bad record, so by default the file stops at the first one and
# with on_bad_record: skip those four pairs are skipped whole (positives and negatives stay balanced).
EMPTY_CHOSEN_LINES = (87, 517, 926, 1104)
N_PAIRS = N_RECORDS - len(EMPTY_CHOSEN_LINES)


def test_hh_file_stops_at_its_first_empty_response(hh_file: Path) -> None:
    dm = PointwiseDataModule(train=str(hh_file), max_length=256)
    with pytest.raises(DataError, match=rf"^{hh_file}:87: field 'chosen': the final assistant response is empty"):
        dm.read_examples(str(hh_file), "train", SkipReport("train"))


def test_hh_file_becomes_pointwise_samples(hh_file: Path) -> None:
    dm = PointwiseDataModule(train=str(hh_file), max_length=256, batch_size=16, on_bad_record="skip")
    report = SkipReport("train")
    examples = dm.read_examples(str(hh_file), "train", report)
    assert report.total == len(EMPTY_CHOSEN_LINES)
    assert {e.location.line for e in examples}.isdisjoint(EMPTY_CHOSEN_LINES)
    assert len(examples) == 2 * N_PAIRS
    # each pair gives chosen (1) then rejected (0), sharing the prompt up to the last assistant turn
    assert [e.score for e in examples[:4]] == [1.0, 0.0, 1.0, 0.0]
    assert sum(e.score for e in examples) == N_PAIRS
    assert all(e.prompt.endswith(ASSISTANT_MARKER) and e.prompt.startswith("\n\nHuman:") for e in examples)
    assert all(ASSISTANT_MARKER not in e.response and e.response.strip() for e in examples)
    # chosen and rejected share the prompt, except in the five pairs where one response itself holds
    # an "\n\nAssistant:" turn (lines 1255, 1689, 1951, 1953, 2037): splitting at the last one differs
    differ = [a.location.line for a, b in zip(examples[::2], examples[1::2]) if a.prompt != b.prompt]
    assert differ == [1255, 1689, 1951, 1953, 2037]
    assert str(examples[-1].location) == f"{hh_file}:{N_RECORDS}"

    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 2 * N_PAIRS
    assert dict(dm.skipped["train"].counts) == {"field 'chosen': the final assistant response is empty": 4}
    assert sum(item["score"] for item in train.items) == N_PAIRS
    eos = dm.tokenizer.eos_token_id
    for item in train.items:
        labels = item["labels"]
        assert len(item["input_ids"]) <= 256
        assert labels[0] == IGNORE_INDEX and labels[-1] != IGNORE_INDEX
    # untruncated samples end with EOS; a truncated one lost it with the end of its response
    assert sum(int(item["input_ids"][-1] == eos) for item in train.items) > N_PAIRS
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 256
