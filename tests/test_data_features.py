"""Tokenized features: masking, EOS, truncation, chat templates, padding, splits, length grouping."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from ulma_lightning import PointwiseDataModule
from ulma_lightning.data.features import Truncation
from ulma_lightning.data.samplers import LengthGroupedSampler, ResumableSampler
from ulma_lightning.logprobs import IGNORE_INDEX
from ulma_lightning.tokenizers import load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def split_sample(item: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a feature item, from its label mask."""
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    n_prompt = sum(1 for label in labels if label == IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the mask is one prefix
    assert labels[n_prompt:] == ids[n_prompt:]  # every response token is labelled with itself
    return ids[:n_prompt], ids[n_prompt:]


def build(tmp_path: Path, records: list[dict], **kwargs) -> PointwiseDataModule:
    dm = PointwiseDataModule(train=str(write_jsonl(tmp_path / "data.jsonl", records)), **kwargs)
    dm.setup("fit")
    return dm


def test_prompt_is_masked_and_response_plus_eos_is_labelled(tmp_path: Path) -> None:
    dm = build(tmp_path, [{"prompt": "How do I make tea?", "response": "Boil water first.", "score": 1}])
    tokenizer = dm.tokenizer
    prompt, response = split_sample(dm.datasets["train"][0])
    # plain HH text without a chat template; the response follows after one space and ends in EOS
    assert tokenizer.decode(prompt) == "\n\nHuman: How do I make tea?\n\nAssistant:"
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == " Boil water first."


def test_chat_message_prompt_without_template_becomes_hh_text(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tea?"},
    ]
    dm = build(tmp_path, [{"prompt": messages, "response": "Yes.", "score": 0}])
    prompt, _ = split_sample(dm.datasets["train"][0])
    assert dm.tokenizer.decode(prompt) == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tea?\n\nAssistant:"


def test_chat_template_formats_prompts_when_the_tokenizer_has_one(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    templated = load_tokenizer("builtin:demo")
    templated.chat_template = CHAT_TEMPLATE
    templated.save_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tea?"}]
    records = [
        {"prompt": messages, "response": " Yes. ", "score": 1},
        {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tea?\n\nAssistant:", "response": "No.", "score": 0},
        {"prompt": "Tea?", "response": "Maybe.", "score": 0},
    ]
    dm = build(tmp_path, records, tokenizer=str(folder))
    texts = [[dm.tokenizer.decode(part) for part in split_sample(item)] for item in dm.datasets["train"].items]
    eos = dm.tokenizer.eos_token
    assert texts == [
        ["<|system|>Be brief.\n<|user|>Tea?\n<|assistant|>", "Yes." + eos],
        ["<|user|>Hi\n<|assistant|>Hello!\n<|user|>Tea?\n<|assistant|>", "No." + eos],  # HH text parsed into turns
        ["<|user|>Tea?\n<|assistant|>", "Maybe." + eos],
    ]


def test_truncation_keeps_the_end_of_the_prompt_then_cuts_the_response() -> None:
    prompt, response = list(range(100, 130)), list(range(5))
    # the prompt gives up its beginning, only as far as needed
    assert Truncation(16, 8).apply(prompt, response) == (prompt[-11:], response)
    # not below max_prompt_length; then the response is cut from its end
    long_response = list(range(20))
    assert Truncation(16, 8).apply(prompt, long_response) == (prompt[-8:], long_response[:8])
    # a short prompt is never cut to make room
    assert Truncation(16, 8).apply(prompt[:4], long_response) == (prompt[:4], long_response[:12])
    # nothing to do when it fits
    assert Truncation(64, 8).apply(prompt, response) == (prompt, response)


def test_max_length_truncation_in_the_datamodule(tmp_path: Path, demo_tokenizer) -> None:
    history = "".join(f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(6))
    prompt = history + "\n\nHuman: How do I make tea?\n\nAssistant:"
    response = " Boil fresh water, pour it over the leaves, wait three minutes, then add milk."
    full_prompt = demo_tokenizer(prompt)["input_ids"]
    full_response = demo_tokenizer(response, add_special_tokens=False)["input_ids"] + [demo_tokenizer.eos_token_id]
    max_length, max_prompt = 24, 12
    assert len(full_prompt) > max_length and len(full_response) > max_length - max_prompt
    dm = build(
        tmp_path,
        [{"prompt": prompt, "response": response, "score": 1}],
        max_length=max_length,
        max_prompt_length=max_prompt,
    )
    kept_prompt, kept_response = split_sample(dm.datasets["train"][0])
    assert len(kept_prompt) + len(kept_response) == max_length
    assert kept_prompt == full_prompt[-max_prompt:]  # the turn being answered survives
    assert kept_response == full_response[: max_length - max_prompt]


def bos_tokenizer_folder(folder: Path) -> Path:
    """The demo tokenizer with a BOS ``<s>`` that a TemplateProcessing post-processor puts first, saved."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    demo = load_tokenizer("builtin:demo")
    backend = demo.backend_tokenizer
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=demo.eos_token, pad_token=demo.pad_token
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_left_truncation_keeps_the_bos_the_tokenizer_adds(tmp_path: Path) -> None:
    folder = bos_tokenizer_folder(tmp_path / "bos_tokenizer")
    history = "".join(f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(6))
    prompt = history + "\n\nHuman: How do I make tea?\n\nAssistant:"
    max_length, max_prompt = 24, 12
    dm = build(
        tmp_path, [{"prompt": prompt, "response": " Boil fresh water, pour it over the leaves, wait.", "score": 1}],
        tokenizer=str(folder), max_length=max_length, max_prompt_length=max_prompt,
    )  # fmt: skip
    bos = dm.tokenizer.bos_token_id
    full_prompt = dm.tokenizer(prompt)["input_ids"]
    assert full_prompt[0] == bos and full_prompt.count(bos) == 1 and len(full_prompt) > max_length  # it adds one
    kept_prompt, kept_response = split_sample(dm.datasets["train"][0])
    assert len(kept_prompt) + len(kept_response) == max_length
    assert kept_prompt == [bos] + full_prompt[-(max_prompt - 1) :]  # BOS, then the end of the prompt
    assert (kept_prompt + kept_response).count(bos) == 1  # not duplicated
    generation_prompt = dm.prompt_dataset("train")[0]["input_ids"]  # prompts for generation are cut alike
    assert generation_prompt == [bos] + full_prompt[-(max_prompt - 1) :]
    # the pure function: no BOS id, or a prompt not starting with it, is cut as before
    assert Truncation(16, 8, bos_token_id=7).apply([7] + list(range(100, 129)), [1, 2]) == (
        [7] + list(range(116, 129)),
        [1, 2],
    )
    assert Truncation(16, 8, bos_token_id=7).apply(list(range(100, 130)), [1, 2]) == (list(range(116, 130)), [1, 2])


def test_samples_without_response_tokens_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_prompt = "Please tell me, step by step and in great detail, how to bake bread at home."
    records = [
        {"prompt": "Hi", "response": "Hello.", "score": 1},
        {"prompt": long_prompt, "response": "Sure.", "score": 1},
        {"prompt": long_prompt + " Again.", "response": "No.", "score": 0},
    ]
    with caplog.at_level(logging.WARNING, logger="ulma_lightning.data"):
        dm = build(tmp_path, records, max_length=24, max_prompt_length=24)
    assert len(dm.datasets["train"]) == 1
    reason = "no response tokens left after truncation to max_length"
    assert dict(dm.skipped["train"].counts) == {reason: 2}
    assert dm.skipped["train"].examples[reason].endswith("data.jsonl:2")
    assert any("skipped 2 record(s): " + reason in r.getMessage() for r in caplog.records)


def test_dynamic_padding_pads_each_batch_to_its_own_longest() -> None:
    dm = PointwiseDataModule(train="demo://binary?n=64", batch_size=8)
    dm.setup("fit")
    widths = set()
    for batch in dm.train_dataloader():
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())
        # padding: pad id in input_ids, IGNORE_INDEX in labels, 0 in the attention mask
        padded = batch["attention_mask"] == 0
        assert bool((batch["input_ids"][padded] == dm.tokenizer.pad_token_id).all())
        assert bool((batch["labels"][padded] == IGNORE_INDEX).all())
        widths.add(batch["input_ids"].shape[1])
    assert len(widths) > 1
    dm.pad_to_multiple_of = 8
    assert all(batch["input_ids"].shape[1] % 8 == 0 for batch in dm.train_dataloader())


def test_val_fraction_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "score": i % 2} for i in range(50)],
    )

    def split(seed: int) -> tuple[set, set]:
        dm = PointwiseDataModule(train=str(path), val_fraction=0.2, split_seed=seed)
        dm.setup("fit")
        return tuple({tuple(item["input_ids"].tolist()) for item in dm.datasets[s].items} for s in ("train", "val"))

    train, val = split(0)
    assert (len(train), len(val)) == (40, 10)
    assert not train & val
    assert split(0) == (train, val)
    assert split(1)[1] != val  # another seed, another hold-out


def test_group_by_length_cuts_padding_and_covers_every_index_once() -> None:
    def padding(loader) -> tuple[int, list[int]]:
        pads, seen = 0, []
        for batch in loader:
            pads += int((batch["attention_mask"] == 0).sum())
            seen += batch["index"].tolist()
        return pads, seen

    dm = PointwiseDataModule(train="demo://binary?n=240", batch_size=8)
    dm.setup("fit")
    random_pads, random_seen = padding(dm.train_dataloader())
    dm.group_by_length = True
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.lengths is not None  # length-grouped order
    grouped_pads, grouped_seen = padding(loader)
    assert sorted(random_seen) == sorted(grouped_seen) == list(range(240))
    assert grouped_pads < random_pads / 2
    # the next epoch is another order, still each index once
    loader.sampler.set_epoch(1)
    next_pads, next_seen = padding(loader)
    assert sorted(next_seen) == list(range(240)) and next_seen != grouped_seen
    assert next_pads < random_pads / 2


def test_length_grouped_sampler_is_deterministic_per_seed_and_epoch() -> None:
    lengths = torch.randint(1, 100, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=4, group_size=5, seed=3)
    first = list(sampler)
    assert len(sampler) == 200 and sorted(first) == list(range(200))
    assert list(LengthGroupedSampler(lengths, batch_size=4, group_size=5, seed=3)) == first
    # within each batch, lengths are sorted (longest first) because batches are cut from sorted groups
    batches = [first[i : i + 4] for i in range(0, 200, 4)]
    assert all(all(lengths[a] >= lengths[b] for a, b in zip(batch, batch[1:])) for batch in batches)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(200)) and list(sampler) != first


def test_integer_columns_stay_exact_integers_in_batches() -> None:
    """Indices and index columns (KTO's ``kl_partner``) above 2^24 survive collation exactly."""
    dm = PointwiseDataModule(train="demo://binary?n=4", batch_size=4, val_fraction=0.0)
    dm.setup("fit")
    large = torch.arange(4, dtype=torch.long) + 2**24 + 1  # 2^24 + 1 is not a float32
    dm.set_column("train", "kl_partner", large)
    dm.set_column("train", "reference_logps", torch.tensor([-1.5, -2.0, -0.25, -3.0]))
    dataset = dm.datasets["train"]
    batch = dm.collator([dataset[i] for i in range(len(dataset))])
    assert batch["kl_partner"].dtype == torch.long and torch.equal(batch["kl_partner"], large)
    assert batch["index"].dtype == torch.long
    assert batch["reference_logps"].dtype == torch.float32 and batch["score"].dtype == torch.float32
    assert torch.equal(batch["reference_logps"], torch.tensor([-1.5, -2.0, -0.25, -3.0]))
