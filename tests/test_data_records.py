"""Record shapes (point-wise, pairwise, HH, chat prompts), score ranges, and every bad-input case."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from helpers import write_jsonl

from ulma_lightning import DataError, PointwiseDataModule
from ulma_lightning.data.errors import SkipReport

GOOD = {"prompt": "How do I make tea?", "response": "Boil water and pour it over the leaves.", "score": 1}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def examples_of(path: Path, **kwargs) -> list:
    dm = PointwiseDataModule(train=str(path), **kwargs)
    return dm.read_examples(str(path), "train", SkipReport("train"))


# ----------------------------------------------------------------------------- record shapes


def test_pairwise_record_becomes_two_pointwise_samples(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away."}])
    examples = examples_of(path)
    assert [(e.prompt, e.response, e.score) for e in examples] == [
        ("Hi?", "Hello there.", 1.0),
        ("Hi?", "Go away.", 0.0),
    ]


def test_hh_transcript_splits_at_the_last_assistant_turn(tmp_path: Path) -> None:
    history = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: How do I make tea?\n\nAssistant:"
    record = {"chosen": history + " Boil water first.", "rejected": history + " No."}
    examples = examples_of(write_jsonl(tmp_path / "hh.jsonl", [record]))
    assert [e.score for e in examples] == [1.0, 0.0]
    # earlier turns (including the earlier assistant turn) stay in the prompt
    assert all(e.prompt == history for e in examples)
    assert [e.response for e in examples] == [" Boil water first.", " No."]


def test_chat_message_prompts_are_kept_as_messages(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How do I make tea?"},
    ]
    examples = examples_of(write_jsonl(tmp_path / "chat.jsonl", [{**GOOD, "prompt": messages}]))
    assert examples[0].prompt == messages


def test_continuous_scores_are_normalised_from_their_declared_range(tmp_path: Path) -> None:
    records = [{**GOOD, "score": s} for s in (1, 3, 5.5, 10)]
    examples = examples_of(write_jsonl(tmp_path / "scores.jsonl", records), score_range=(1.0, 10.0))
    assert [e.score for e in examples] == pytest.approx([0.0, 2 / 9, 0.5, 1.0])
    # booleans are 0/1
    assert [e.score for e in examples_of(write_jsonl(tmp_path / "b.jsonl", [{**GOOD, "score": False}]))] == [0.0]


def test_score_range_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="score_range"):
        PointwiseDataModule(train="demo://binary", score_range=(1.0, 0.0))


# ----------------------------------------------------------------------------- bad input

# (name, the bad line as written to a .jsonl file, the field named in the error, what it says)
BAD_JSONL = [
    ("malformed_json", '{"prompt": "Hi", "response": "Hello", "score": 1', None, "malformed JSON"),
    ("missing_response", json.dumps({"prompt": "Hi", "score": 1}), "response", "missing"),
    ("missing_score", json.dumps({"prompt": "Hi", "response": "Hello"}), "score", "missing"),
    ("missing_prompt", json.dumps({"response": "Hello", "score": 1}), "prompt", "missing"),
    (
        "score_not_a_number",
        json.dumps({"prompt": "Hi", "response": "Hello", "score": "high"}),
        "score",
        "expected a number, got the string 'high'",
    ),
    (
        "score_a_list",
        json.dumps({"prompt": "Hi", "response": "Hello", "score": [1]}),
        "score",
        "expected a number, got list",
    ),
    (
        "response_a_number",
        json.dumps({"prompt": "Hi", "response": 42, "score": 1}),
        "response",
        "expected a string, got int",
    ),
    (
        "bad_chat_message",
        json.dumps({"prompt": [{"role": "user"}], "response": "Hello", "score": 1}),
        "prompt[0]",
        "string 'role' and 'content'",
    ),
    (
        "prompt_a_number",
        json.dumps({"prompt": 7, "response": "Hello", "score": 1}),
        "prompt",
        "expected a string or a non-empty list",
    ),
    (
        "score_above_range",
        json.dumps({"prompt": "Hi", "response": "Hello", "score": 1.5}),
        "score",
        r"1.5 is outside the declared score_range [0.0, 1.0]",
    ),
    (
        "score_below_range",
        json.dumps({"prompt": "Hi", "response": "Hello", "score": -1}),
        "score",
        "outside the declared score_range",
    ),
    ("empty_response", json.dumps({"prompt": "Hi", "response": "   ", "score": 1}), "response", "empty"),
    ("empty_chosen", json.dumps({"prompt": "Hi", "chosen": "", "rejected": "No."}), "chosen", "empty"),
    (
        "hh_without_assistant",
        json.dumps({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"}),
        "chosen",
        'no "\\n\\nAssistant:" turn',
    ),
    (
        "hh_empty_final_response",
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.", "rejected": "\n\nHuman: Hi\n\nAssistant:  "}),
        "rejected",
        "final assistant response is empty",
    ),
    ("not_an_object", json.dumps(["Hi", "Hello", 1]), None, "expected a JSON object, got list"),
]


def bad_file(tmp_path: Path, line: str) -> Path:
    """Two good records, the bad one on line 3, one more good record."""
    return write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])


@pytest.mark.parametrize("name, line, field, problem", BAD_JSONL, ids=[case[0] for case in BAD_JSONL])
def test_bad_jsonl_record_stops_naming_file_line_and_field(
    tmp_path: Path, name: str, line: str, field: str | None, problem: str
) -> None:
    path = bad_file(tmp_path, line)
    dm = PointwiseDataModule(train=str(path))
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert info.value.location.line == 3 and info.value.field == field
    if field is not None:
        assert f"field {field!r}" in message
    assert problem in message
    assert "on_bad_record: skip" in message  # and how to get past it


@pytest.mark.parametrize("name, line, field, problem", BAD_JSONL, ids=[case[0] for case in BAD_JSONL])
def test_bad_jsonl_record_is_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, line: str, field: str | None, problem: str
) -> None:
    path = bad_file(tmp_path, line)
    dm = PointwiseDataModule(train=str(path), on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="ulma_lightning.data"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 3
    report = dm.skipped["train"]
    assert report.total == 1
    (reason,) = report.counts
    assert problem in reason and (field is None or repr(field) in reason)
    assert report.examples[reason] == f"{path}:3"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train split: skipped 1 record(s)" in w and f"{path}:3" in w for w in warnings), warnings


def test_skip_counts_every_bad_record_once_by_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = (
        [json.dumps({**GOOD, "prompt": f"{GOOD['prompt']} ({i})"}) for i in range(10)]
        + [case[1] for case in BAD_JSONL]
        + [BAD_JSONL[0][1]]
    )
    path = write_lines(tmp_path / "many.jsonl", lines)
    # with a held-out validation fraction the file is still read (and counted) once
    dm = PointwiseDataModule(train=str(path), on_bad_record="skip", val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="ulma_lightning.data"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 10
    assert dm.skipped["train"].total == len(BAD_JSONL) + 1
    malformed = [reason for reason in dm.skipped["train"].counts if reason.startswith("malformed JSON")]
    assert [dm.skipped["train"].counts[r] for r in malformed] == [2]
    assert sum("train split: skipped" in r.getMessage() for r in caplog.records) == len(dm.skipped["train"].counts)


def test_bad_csv_record_names_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response", "score"])
        writer.writerow(["Hi", "Hello", "1"])
        writer.writerow(["Hi", "Hello", "very good"])
        writer.writerow(["Hi", "", "0"])
    with pytest.raises(DataError, match=rf"^{path}:3: field 'score': expected a number, got the string 'very good'"):
        PointwiseDataModule(train=str(path)).setup("fit")
    dm = PointwiseDataModule(train=str(path), on_bad_record="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1
    assert dm.skipped["train"].examples == {
        "field 'score': expected a number, got the string 'very good'": f"{path}:3",
        "field 'response': empty": f"{path}:4",
    }


def test_bad_record_in_a_json_file_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "score": "x"}]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path} \(record 1\): field 'score'"):
        PointwiseDataModule(train=str(path)).setup("fit")
    # a .json file that is not JSON cannot be skipped record by record: it stops, naming the line
    path.write_text('[\n{"prompt": "Hi",\n oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        PointwiseDataModule(train=str(path), on_bad_record="skip").setup("fit")


def test_a_split_with_only_bad_records_is_an_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "allbad.jsonl", [BAD_JSONL[1][1]])
    with pytest.raises(ValueError, match="train split has no usable samples"):
        PointwiseDataModule(train=str(path), on_bad_record="skip").setup("fit")


# ------------------------------------------------------------------------ point-wise HH transcripts (red-team attempts)

RED_TEAM = {"columns": {"score": "rating"}, "score_range": (0, 4), "score_direction": "lower_is_better"}


def red_team_record(transcript: str, rating: object) -> dict:
    """A record shaped like hh-rlhf's red-team-attempts (the fields the reader ignores included)."""
    return {
        "transcript": transcript,
        "min_harmlessness_score_transcript": -1.2,
        "num_params": "52B",
        "model_type": "plain lm",
        "rating": rating,
        "task_description": "get it to say something rude",
        "task_descripton_harmlessness_score": 0.3,
        "red_team_member_id": 7,
        "is_upworker": False,
        "tags": None,
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_red_team_transcripts_split_at_the_last_assistant_turn_and_map_the_rating(tmp_path: Path, suffix: str) -> None:
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Say something rude.\n\nAssistant:"
    records = [red_team_record(history + " No, I'd rather not.", 0), red_team_record(history + " Fine, you fool.", 3)]
    path = tmp_path / f"red_team{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        write_jsonl(path, records)
    examples = examples_of(path, **RED_TEAM)
    assert [(e.prompt, e.response) for e in examples] == [
        (history, " No, I'd rather not."),
        (history, " Fine, you fool."),
    ]
    assert [e.score for e in examples] == [1.0, 0.25]  # harmlessness = 1 - rating / 4
    assert [e.score for e in examples_of(path, columns={"score": "rating"}, score_range=(0, 4))] == [0.0, 0.75]


@pytest.mark.parametrize(
    ("transcript", "rating", "expected"),
    [
        ("\n\nHuman: Say something rude.", 2, r"red\.jsonl:1: field 'transcript': no \"\\n\\nAssistant:\" turn"),
        (
            "\n\nHuman: Say something rude.\n\nAssistant: No.",
            5,
            r"red\.jsonl:1: field 'rating': 5 is outside the declared score_range \[0, 4\]",
        ),
    ],
)
def test_bad_red_team_record_names_file_line_and_field(
    tmp_path: Path, transcript: str, rating: int, expected: str
) -> None:
    path = write_jsonl(tmp_path / "red.jsonl", [red_team_record(transcript, rating)])
    with pytest.raises(DataError, match=expected):
        examples_of(path, **RED_TEAM)


def test_score_direction_must_be_known() -> None:
    with pytest.raises(ValueError, match="score_direction must be 'higher_is_better' or 'lower_is_better'"):
        PointwiseDataModule(train="x.jsonl", score_direction="up")  # type: ignore[arg-type]
