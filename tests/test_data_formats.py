"""TRL's dataset formats read as they are (standard and conversational), by every data module that
fits them; the chat-template identity; each bad shape's error; and splits mixed from several sources
(weights, counts, a default score, exact resume, per-source counts in the log)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from ulma_lightning import DataError, DemonstrationDataModule, PairwiseDataModule, PointwiseDataModule
from ulma_lightning.cli import main
from ulma_lightning.data.mixing import source_specs
from ulma_lightning.data.prompt_data import PromptDataModule
from ulma_lightning.logprobs import IGNORE_INDEX
from ulma_lightning.tokenizers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_EOS_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
HH = "\n\nHuman: How do I make tea?\n\nAssistant:"

# format -> (standard record, conversational record); the first record of each file
STANDARD = {
    "prompt-completion": {"prompt": "How do I make tea?", "completion": "Boil water."},
    "pointwise": {"prompt": "How do I make tea?", "completion": "Boil water.", "score": 1.0},
    "unpaired-preference": {"prompt": "How do I make tea?", "completion": "Boil water.", "label": True},
    "preference": {"prompt": "How do I make tea?", "chosen": "Boil water.", "rejected": "No."},
    "implicit-preference": {"chosen": HH + " Boil water.", "rejected": HH + " No."},
    "text": {"text": "Tea is made with boiled water."},
}
CONVERSATIONAL = {
    "prompt-completion": {"prompt": [SYSTEM, user("How do I make tea?")], "completion": [assistant("Boil water.")]},
    "pointwise": {"prompt": [user("How do I make tea?")], "completion": [assistant("Boil water.")], "score": 1.0},
    "unpaired-preference": {
        "prompt": [user("How do I make tea?")],
        "completion": [assistant("Boil water.")],
        "label": True,
    },
    "preference": {
        "prompt": [user("How do I make tea?")],
        "chosen": [assistant("Boil water.")],
        "rejected": [assistant("No.")],
    },
    "implicit-preference": {
        "chosen": [SYSTEM, user("How do I make tea?"), assistant("Boil water.")],
        "rejected": [SYSTEM, user("How do I make tea?"), assistant("No.")],
    },
    "messages": {"messages": [user("Hi"), assistant("Hello!"), user("How do I make tea?"), assistant("Boil water.")]},
}


def variants(record: dict, n: int = 4) -> list[dict]:
    """``n`` records like ``record`` with different texts (and, where it has one, alternating label/score)."""

    def vary(value, i):
        if isinstance(value, str):
            return value.replace("tea", f"tea no. {i}")
        if isinstance(value, list):
            return [{**m, "content": m["content"].replace("tea", f"tea no. {i}")} for m in value]
        return value

    out = []
    for i in range(n):
        varied = {k: vary(v, i) for k, v in record.items()}
        if "label" in varied:
            varied["label"] = i % 2 == 0
        if "score" in varied:
            varied["score"] = float(i % 2 == 0)
        out.append(varied)
    return out


def write(path: Path, records: list[dict]) -> Path:
    """``records`` as ``path``: .jsonl, .json, .csv (strings), .parquet, or a dataset folder (no suffix)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def examples(module: type, records: list[dict], tmp_path: Path, **kwargs) -> list:
    dm = module(train=str(write(tmp_path / "data.jsonl", records)), **kwargs)
    dm.setup("fit")
    return dm.examples["train"]


# ----------------------------------------------------------------------------- what each module reads


def test_pointwise_reads_every_format_without_a_column_mapping(tmp_path: Path) -> None:
    got = examples(
        PointwiseDataModule,
        [STANDARD["pointwise"], STANDARD["unpaired-preference"], {**STANDARD["unpaired-preference"], "label": False},
         CONVERSATIONAL["preference"], CONVERSATIONAL["implicit-preference"], STANDARD["implicit-preference"]],
        tmp_path,
    )  # fmt: skip
    assert [(e.prompt, e.response, e.score) for e in got] == [
        ("How do I make tea?", "Boil water.", 1.0),
        ("How do I make tea?", "Boil water.", 1.0),  # label true: a positive
        ("How do I make tea?", "Boil water.", 0.0),  # label false: a negative
        ([user("How do I make tea?")], [assistant("Boil water.")], 1.0),  # chosen 1, rejected 0
        ([user("How do I make tea?")], [assistant("No.")], 0.0),
        ([SYSTEM, user("How do I make tea?")], [assistant("Boil water.")], 1.0),  # shared leading messages: the prompt
        ([SYSTEM, user("How do I make tea?")], [assistant("No.")], 0.0),
        (HH, " Boil water.", 1.0),  # HH transcripts, as before
        (HH, " No.", 0.0),
    ]


def test_pointwise_records_without_a_score_need_their_sources_default(tmp_path: Path) -> None:
    records = [STANDARD["prompt-completion"], CONVERSATIONAL["messages"], STANDARD["text"]]
    path = write(tmp_path / "sft.jsonl", records)
    with pytest.raises(
        DataError, match=r"sft\.jsonl:1: field 'score': missing: a prompt-completion .* carries no score.*score: 1\.0"
    ):
        PointwiseDataModule(train=str(path)).setup("fit")
    dm = PointwiseDataModule(train=[{"source": str(path), "score": 1.0}])
    dm.setup("fit")
    assert [(e.prompt, e.response, e.score) for e in dm.examples["train"]] == [
        ("How do I make tea?", "Boil water.", 1.0),
        ([user("Hi"), assistant("Hello!"), user("How do I make tea?")], [assistant("Boil water.")], 1.0),
        (None, "Tea is made with boiled water.", 1.0),  # language modeling: no prompt
    ]


def test_pairwise_reads_explicit_and_implicit_prompts_in_both_forms(tmp_path: Path) -> None:
    got = examples(
        PairwiseDataModule,
        [
            STANDARD["preference"],
            CONVERSATIONAL["preference"],
            STANDARD["implicit-preference"],
            CONVERSATIONAL["implicit-preference"],
        ],
        tmp_path,
    )
    assert [(e.prompt, e.chosen, e.rejected) for e in got] == [
        ("How do I make tea?", "Boil water.", "No."),
        ([user("How do I make tea?")], [assistant("Boil water.")], [assistant("No.")]),
        (HH, " Boil water.", " No."),
        ([SYSTEM, user("How do I make tea?")], [assistant("Boil water.")], [assistant("No.")]),
    ]


def test_demonstrations_read_prompt_completion_and_language_modeling(tmp_path: Path) -> None:
    records = [STANDARD["prompt-completion"], CONVERSATIONAL["prompt-completion"], CONVERSATIONAL["messages"],
               STANDARD["text"], CONVERSATIONAL["implicit-preference"], STANDARD["unpaired-preference"],
               {**STANDARD["unpaired-preference"], "label": False}]  # fmt: skip
    got = examples(DemonstrationDataModule, records, tmp_path, min_score=1.0)
    assert [(e.prompt, e.response) for e in got] == [
        ("How do I make tea?", "Boil water."),
        ([SYSTEM, user("How do I make tea?")], [assistant("Boil water.")]),  # the system message is kept
        ([user("Hi"), assistant("Hello!"), user("How do I make tea?")], [assistant("Boil water.")]),
        (None, "Tea is made with boiled water."),
        ([SYSTEM, user("How do I make tea?")], [assistant("Boil water.")]),  # the chosen side
        ("How do I make tea?", "Boil water."),  # label true kept, label false below min_score
    ]


def test_prompt_data_reads_conversations(tmp_path: Path) -> None:
    records = [CONVERSATIONAL["messages"], {"messages": [SYSTEM, user("Tea?")]}, CONVERSATIONAL["implicit-preference"]]
    got = examples(PromptDataModule, records, tmp_path)
    assert [e.prompt for e in got] == [
        [user("Hi"), assistant("Hello!"), user("How do I make tea?")],
        [SYSTEM, user("Tea?")],  # ends with the user: the whole conversation is the prompt
        [SYSTEM, user("How do I make tea?")],
    ]


def test_text_is_trained_whole_and_the_format_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "lm.jsonl", variants(STANDARD["text"], 3))
    dm = DemonstrationDataModule(train=str(path))
    with caplog.at_level(logging.INFO, logger="ulma_lightning.data"):
        dm.setup("fit")
    item = dm.datasets["train"][0]
    with pytest.raises(ValueError, match="no prompts to generate for"):  # text has no prompt to generate from
        dm.prompt_dataset("train")
    assert (item["labels"] != IGNORE_INDEX).all()  # no prompt: every token is trained on
    assert dm.tokenizer.decode(item["input_ids"][:-1]) == "Tea is made with boiled water."  # as it is, no leading space
    assert item["input_ids"][-1] == dm.tokenizer.eos_token_id
    lines = [r.getMessage() for r in caplog.records if "record format" in r.getMessage()]
    assert lines == [f"train split: {path}: record format text (standard): 3"]


# ----------------------------------------------------------------------------- the chat template


def chat_tokenizer(folder: Path, template: str = CHATML) -> Path:
    """The demo tokenizer with a chat template (ChatML: its turns end in the EOS token), saved to ``folder``."""
    tokenizer = load_tokenizer("builtin:demo")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template == CHATML:
        tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    assert (folder / "chat_template.jinja").exists()  # transformers 5 saves the template beside the tokenizer
    return folder


def templated_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_conversational_samples_are_the_chat_templates_own_tokens(tmp_path: Path) -> None:
    folder = chat_tokenizer(tmp_path / "chatml")
    conversations = [
        CONVERSATIONAL["prompt-completion"]["prompt"] + CONVERSATIONAL["prompt-completion"]["completion"],
        CONVERSATIONAL["messages"]["messages"],  # multi-turn prompt
    ]
    dm = DemonstrationDataModule(
        train=str(write(tmp_path / "chat.jsonl", [CONVERSATIONAL["prompt-completion"], CONVERSATIONAL["messages"]])),
        tokenizer=str(folder),
    )
    dm.setup("fit")
    tokenizer = load_tokenizer(str(folder))  # reloaded from the folder
    for item, conversation in zip(dm.datasets["train"].items, conversations):
        whole = templated_ids(tokenizer, conversation)
        prompt = templated_ids(tokenizer, conversation[:-1], add_generation_prompt=True)
        assert item["input_ids"].tolist() == whole  # the same ids as apply_chat_template on the whole conversation
        assert (item["labels"] == IGNORE_INDEX).sum() == len(prompt)  # the prompt (with generation prompt) is masked
        assert whole.count(tokenizer.eos_token_id) == len(conversation)  # no EOS added: the template ends the turn
    pairs = PairwiseDataModule(
        train=str(write(tmp_path / "pairs.parquet", [CONVERSATIONAL["implicit-preference"]])), tokenizer=str(folder)
    )
    pairs.setup("fit")
    (item,) = pairs.datasets["train"].items
    for side in ("chosen", "rejected"):
        assert item[f"{side}_input_ids"].tolist() == templated_ids(
            tokenizer, CONVERSATIONAL["implicit-preference"][side]
        )


def test_a_template_that_writes_no_eos_gets_one_after_the_assistant_turn(tmp_path: Path) -> None:
    folder = chat_tokenizer(tmp_path / "plain", NO_EOS_TEMPLATE)
    record = CONVERSATIONAL["pointwise"]
    dm = PointwiseDataModule(train=str(write(tmp_path / "p.jsonl", [record])), tokenizer=str(folder))
    dm.setup("fit")
    tokenizer = load_tokenizer(str(folder))
    whole = templated_ids(tokenizer, record["prompt"] + record["completion"])
    assert dm.datasets["train"][0]["input_ids"].tolist() == whole + [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------- bad shapes

BAD = [
    (
        "multi-turn completion",
        PointwiseDataModule,
        {"prompt": [user("Hi")], "completion": [assistant("A."), user("B?")], "score": 1},
        "completion",
        "a multi-turn completion (2 messages)",
    ),
    (
        "completion not the assistant's",
        DemonstrationDataModule,
        {"prompt": [user("Hi")], "completion": [user("A.")]},
        "completion[0]",
        "the completion's role is 'user'",
    ),
    (
        "last turn not the assistant's",
        DemonstrationDataModule,
        {"messages": [user("Hi"), assistant("Hello"), user("Tea?")]},
        "messages",
        "last turn is 'user', not the assistant's",
    ),
    (
        "no shared prompt",
        PairwiseDataModule,
        {"chosen": [user("A?"), assistant("A.")], "rejected": [user("B?"), assistant("B.")]},
        "rejected",
        "share no leading message",
    ),
    (
        "implicit pair with two-turn answers",
        PairwiseDataModule,
        {
            "chosen": [user("A?"), assistant("A."), user("more?"), assistant("yes")],
            "rejected": [user("A?"), assistant("No.")],
        },
        "chosen",
        "a multi-turn completion (3 messages)",
    ),
    # issue 26, item 6: a pair that prefers neither side trained DPO at a constant ln 2, without a word
    (
        "chosen equals rejected",
        PairwiseDataModule,
        {"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"},
        "rejected",
        "the same response as chosen: the pair prefers neither",
    ),
    (
        "HH transcripts equal",
        PairwiseDataModule,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
        "rejected",
        "the same response as chosen",
    ),
    (
        "conversations equal",
        PairwiseDataModule,
        {"chosen": [user("A?"), assistant("A.")], "rejected": [user("A?"), assistant("A.")]},
        "rejected",
        "the same response as chosen",
    ),
    (
        "label not a boolean",
        PointwiseDataModule,
        {"prompt": "Hi", "completion": "Hello", "label": "maybe"},
        "label",
        "expected a boolean",
    ),
    (
        "no format (point-wise)",
        PointwiseDataModule,
        {"question": "Hi", "answer": "Hello"},
        None,
        "match none of the formats read here: point-wise {prompt, completion, score}; unpaired preference",
    ),
    (
        "no format (demonstration)",
        DemonstrationDataModule,
        {"input": "Hi"},
        None,
        "match none of the formats read here: prompt-completion {prompt, completion}; language modeling {messages}",
    ),
    (
        "no format (pairwise)",
        PairwiseDataModule,
        {"question": "Hi"},
        None,
        "match none of the formats read here: preference {prompt, chosen, rejected}; preference with implicit prompt",
    ),
    (
        "unpaired data for a pairwise method",
        PairwiseDataModule,
        {"prompt": "Hi", "completion": "Hello", "label": True},
        None,
        "unpaired preference {prompt, completion, label} record is not a preference pair",
    ),
]


@pytest.mark.parametrize("name, module, record, field, problem", BAD, ids=[case[0] for case in BAD])
def test_each_bad_shape_names_file_line_and_field_or_is_skipped(
    tmp_path: Path, name: str, module: type, record: dict, field: str | None, problem: str
) -> None:
    good = STANDARD["preference"] if module is PairwiseDataModule else STANDARD["pointwise"]
    path = write(tmp_path / "bad.jsonl", [good, record, good])
    with pytest.raises(DataError) as info:
        module(train=str(path)).setup("fit")
    assert str(info.value).startswith(f"{path}:2: " + (f"field {field!r}: " if field else "")), str(info.value)
    assert problem in str(info.value)
    dm = module(train=str(path), on_bad_record="skip")
    dm.setup("fit")
    assert len(dm.examples["train"]) == 2  # the two good records
    assert dm.skipped["train"].total == 1 and problem in next(iter(dm.skipped["train"].counts))


# ----------------------------------------------------------------------------- mixed sources


def prompt_completions(path: Path, n: int, tag: str) -> Path:
    return write(
        path, [{"prompt": f"{tag} question {i}?", "completion": f"{tag} answer {i}.", "score": 1.0} for i in range(n)]
    )


def epoch_sources(dm) -> list[str]:
    """The source of every training sample of one epoch, in the training order."""
    return [dm.examples["train"][int(i)].location.source for batch in dm.train_dataloader() for i in batch["index"]]


@pytest.mark.parametrize(
    "strategy, expected", [("interleave_under", {"a": 33, "b": 100}), ("interleave_over", {"a": 40, "b": 120})]
)
def test_weighted_sources_give_their_proportions_over_an_epoch(tmp_path: Path, strategy: str, expected: dict) -> None:
    a, b = prompt_completions(tmp_path / "a.jsonl", 40, "a"), prompt_completions(tmp_path / "b.jsonl", 100, "b")
    dm = PointwiseDataModule(
        train=[{"source": str(a), "weight": 1}, {"source": str(b), "weight": 3}], mix_strategy=strategy, batch_size=8
    )
    dm.setup("fit")
    sources = epoch_sources(dm)
    counts = {"a": sources.count(str(a)), "b": sources.count(str(b))}
    assert counts == expected  # 1 : 3 (up to rounding); under: no record repeats, over: every record is used
    drawn = [str(dm.examples["train"][i].response) for i in range(len(dm.examples["train"]))]
    if strategy == "interleave_under":
        assert len(set(drawn)) == len(drawn)
    else:
        assert len({d for d in drawn if d.startswith("a")}) == 40


def test_samples_per_source_and_the_mix_is_reproducible_from_the_seed(tmp_path: Path) -> None:
    a, b = prompt_completions(tmp_path / "a.jsonl", 10, "a"), prompt_completions(tmp_path / "b.jsonl", 50, "b")
    specs = [{"source": str(a), "samples": 25}, {"source": str(b), "samples": 20}]
    first, again, other = (PointwiseDataModule(train=specs, split_seed=seed) for seed in (0, 0, 1))
    for dm in (first, again, other):
        dm.setup("fit")
    responses = [e.response for e in first.examples["train"]]
    assert sum(r.startswith("a") for r in responses) == 25 and sum(r.startswith("b") for r in responses) == 20
    assert all(
        responses.count(f"a answer {i}.") in (2, 3) for i in range(10)
    )  # every record twice, 5 drawn a third time
    assert responses == [e.response for e in again.examples["train"]]  # the same seed: the same mix
    assert responses != [e.response for e in other.examples["train"]]


def test_resume_mid_epoch_continues_the_same_mixed_order(tmp_path: Path) -> None:
    a, b = prompt_completions(tmp_path / "a.jsonl", 30, "a"), prompt_completions(tmp_path / "b.jsonl", 50, "b")
    specs = [{"source": str(a), "weight": 1}, {"source": str(b), "weight": 1}]

    def order(dm) -> list[str]:
        return [dm.examples["train"][int(i)].response for batch in dm.train_dataloader() for i in batch["index"]]

    whole = PointwiseDataModule(train=specs, batch_size=4, split_seed=3)
    whole.setup("fit")
    full = order(whole)
    state = whole.train_dataloader().sampler.state_dict(batches_done=5)  # what a checkpoint after 5 steps holds
    resumed = PointwiseDataModule(train=specs, batch_size=4, split_seed=3)  # a new process reads and mixes again
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    assert [resumed.examples["train"][int(i)].response for batch in loader for i in batch["index"]] == full[20:]
    assert len(full) == 60  # 30 + 30: under-sampled b to a's share


def test_a_demonstration_source_becomes_positives_beside_feedback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sft = write(tmp_path / "sft.jsonl", variants(STANDARD["prompt-completion"], 6))
    feedback = write(
        tmp_path / "feedback.csv",
        [
            {"prompt": "Tea?", "completion": "No.", "score": 0},
            {"prompt": "Tea?", "completion": "Yes.", "score": 4},
            {"prompt": "Tea?", "completion": "Bad", "score": 9},
        ],
    )
    dm = PointwiseDataModule(
        train=[
            {"source": str(sft), "score": 1.0},
            {"source": str(feedback), "score_range": [0, 4], "on_bad_record": "skip"},
        ]
    )
    with caplog.at_level(logging.INFO, logger="ulma_lightning.data"):
        dm.setup("fit")
    scores = [(e.location.source, e.score) for e in dm.examples["train"]]
    assert [s for source, s in scores if source == str(sft)] == [1.0] * 6  # demonstrations: positives
    assert [s for source, s in scores if source == str(feedback)] == [0.0, 1.0]  # through its own score_range
    assert dm.mixed["train"] == {
        str(sft): {"samples": 6, "skipped": 0, "records_drawn": 6},
        str(feedback): {"samples": 2, "skipped": 1, "records_drawn": 2},
    }
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"train split: source {feedback}: 2 samples read (1 skipped), 2 records drawn per epoch" in log
    assert f"train split: {sft}: record format prompt-completion (standard): 6" in log
    assert f"train split: {feedback}: record format pointwise (standard): 3" in log


def test_a_source_with_no_records_is_named(tmp_path: Path) -> None:
    good = prompt_completions(tmp_path / "a.jsonl", 3, "a")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{empty}: the train split has no usable samples: it holds no records"):
        PointwiseDataModule(train=[str(good), str(empty)]).setup("fit")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"source": "a.jsonl", "weights": 2}, r"data\.train\[0\]: unknown option\(s\) \['weights'\]"),
        ({"source": "a.jsonl", "weight": 1, "samples": 3}, "give weight or samples, not both"),
        ({"source": "a.jsonl", "score": 2}, r"score must be in \[0, 1\], got 2"),
        ({"score": 1.0}, "no 'source'"),
        # an infinite weight was a ZeroDivisionError when the mix was sized (issue 26, item 9)
        (
            {"source": "a.jsonl", "weight": float("inf")},
            r"data\.train\[0\] \(a\.jsonl\): weight must be finite and > 0, got inf",
        ),
        ({"source": "a.jsonl", "weight": 0}, r"data\.train\[0\] \(a\.jsonl\): weight must be finite and > 0, got 0"),
        (
            {"source": "a.jsonl", "weight": -1.5},
            r"data\.train\[0\] \(a\.jsonl\): weight must be finite and > 0, got -1\.5",
        ),
        (
            {"source": "a.jsonl", "weight": float("nan")},
            r"data\.train\[0\] \(a\.jsonl\): weight must be finite and > 0, got nan",
        ),
    ],
)
def test_bad_source_options_name_the_entry(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        source_specs([entry], "train")


def test_a_score_on_a_pairwise_source_is_an_error_not_ignored() -> None:
    with pytest.raises(ValueError, match=r"data\.train: source pairs\.jsonl: PairwiseDataModule has no use for score"):
        PairwiseDataModule(train=[{"source": "pairs.jsonl", "score": 1.0}])


# ----------------------------------------------------------------------------- through ulma fit

FAMILIES = {
    # config -> files, one per format and form, each from a different kind of source where it can be
    "ulma.yaml": [
        ("pointwise.csv", STANDARD["pointwise"], {}),
        ("pointwise_chat.parquet", CONVERSATIONAL["pointwise"], {}),
        ("unpaired.csv", STANDARD["unpaired-preference"], {}),
        ("unpaired_chat.jsonl", CONVERSATIONAL["unpaired-preference"], {}),
        ("pairs.json", STANDARD["preference"], {}),
        ("pairs_chat.parquet", CONVERSATIONAL["preference"], {}),
        ("hh.jsonl", STANDARD["implicit-preference"], {}),
        ("implicit_chat", CONVERSATIONAL["implicit-preference"], {}),  # a dataset folder
        ("sft.csv", STANDARD["prompt-completion"], {"score": 1.0}),
        ("sft_chat.jsonl", CONVERSATIONAL["prompt-completion"], {"score": 1.0}),
        ("messages.jsonl", CONVERSATIONAL["messages"], {"score": 1.0}),
        ("text.jsonl", STANDARD["text"], {"score": 1.0}),
    ],
    "dpo.yaml": [
        ("pairs.csv", STANDARD["preference"], {}),
        ("pairs_chat.jsonl", CONVERSATIONAL["preference"], {}),
        ("hh.json", STANDARD["implicit-preference"], {}),
        ("implicit_chat.parquet", CONVERSATIONAL["implicit-preference"], {}),
    ],
    "sft.yaml": [
        ("sft.csv", STANDARD["prompt-completion"], {}),
        ("sft_chat.parquet", CONVERSATIONAL["prompt-completion"], {}),
        ("messages", CONVERSATIONAL["messages"], {}),  # a dataset folder
        ("text.json", STANDARD["text"], {}),
    ],
}


@pytest.mark.integration
@pytest.mark.parametrize("config", sorted(FAMILIES))
def test_every_format_and_form_trains_through_ulma_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str
) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])
    train = []
    for name, record, options in FAMILIES[config]:
        records = variants(record)  # a .csv holds them as strings: label "True", score "1.0"
        train.append({"source": str(write(tmp_path / name, records)), **options})
    settings: dict = {
        "data": {"init_args": {"train": train, "val": train[0]["source"], "test": train[0]["source"], "batch_size": 4}}
    }
    if config == "sft.yaml":  # conversations through a chat template (the model's tokenizer, linked to the data's)
        settings["model"] = {"init_args": {"policy": {"tokenizer": str(chat_tokenizer(tmp_path / "chatml"))}}}
    override = tmp_path / "data.yaml"
    override.write_text(yaml.safe_dump(settings))
    cli = main([
        "fit", "--config", str(REPO / "configs" / config), "--config", str(override),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    assert cli.trainer.global_step == 2
    if config == "sft.yaml":
        tokenizer = cli.datamodule.tokenizer
        assert tokenizer.chat_template == CHATML
        first = next(
            item
            for item, e in zip(cli.datamodule.datasets["train"].items, cli.datamodule.examples["train"])
            if "sft_chat" in e.location.source
        )
        record = variants(CONVERSATIONAL["prompt-completion"])[0]  # the file's first record
        assert first["input_ids"].tolist() == templated_ids(tokenizer, record["prompt"] + record["completion"])
    mixed = cli.datamodule.mixed["train"]
    assert sorted(mixed) == sorted(entry["source"] for entry in train)
    per_record = 2 if config == "ulma.yaml" else 1  # a pair is two point-wise samples
    for name, record, _ in FAMILIES[config]:
        pairs = "chosen" in record
        assert mixed[str(tmp_path / name)] == {
            "samples": 4 * (per_record if pairs else 1),
            "skipped": 0,
            "records_drawn": 4,
        }, name


def test_string_pairs_with_implicit_prompt_split_at_their_common_prefix(tmp_path: Path) -> None:
    """TRL's standard implicit-prompt form: plain strings (not HH transcripts) share the prompt as a prefix."""
    from ulma_lightning.data.errors import DataError
    from ulma_lightning.data.records import parse_demonstration, parse_pair, parse_pointwise
    from ulma_lightning.data.sources import Location

    record = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    where = Location("pairs.jsonl", 3)
    pair = parse_pair(record, where)
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        "The sky is",
        " blue.",
        " green.",
    )  # the space stays with the answer
    assert [(e.prompt, e.response, e.score) for e in parse_pointwise(record, where, (0.0, 1.0))] == [
        ("The sky is", " blue.", 1.0),
        ("The sky is", " green.", 0.0),
    ]
    assert (parse_demonstration(record, where).prompt, parse_demonstration(record, where).response) == (
        "The sky is",
        " blue.",
    )
    with pytest.raises(DataError, match=r"pairs\.jsonl:3.*share no leading text"):
        parse_pair({"chosen": "Yes.", "rejected": "No."}, where)
    with pytest.raises(DataError, match=r"pairs\.jsonl:3.*no answer is left"):
        parse_pair({"chosen": "Same", "rejected": "Same answer"}, where)
