"""KTO's mismatched pairs never pair a prompt with an answer to itself: in unshuffled validation and
test batches of pair data (chosen and rejected side by side), in shuffled training, and in the
fixed partners of ``reference: precomputed``; a batch whose rows all share one prompt has none."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA

from ulma_lightning import KTOModule, PointwiseDataModule, PolicyConfig
from ulma_lightning.logprobs import IGNORE_INDEX
from ulma_lightning.modules.batching import mismatched_partners


def kto(reference: str = "copy") -> KTOModule:
    module = KTOModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo", reference=reference))  # type: ignore[arg-type]
    module.configure_model()
    return module


def pair_data(**kwargs) -> PointwiseDataModule:
    """Demo pairs read as point-wise samples: each record gives chosen (1) then rejected (0)."""
    data = PointwiseDataModule(
        train="demo://pairwise?n=24", val="demo://pairwise?split=test&n=8", max_length=256, **kwargs
    )
    data.setup("fit")
    return data


def split_row(ids: torch.Tensor, labels: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt tokens, response tokens) of one unpadded or right-padded row."""
    response = (labels != IGNORE_INDEX).nonzero().flatten()
    return tuple(ids[: int(response[0])].tolist()), tuple(ids[response].tolist())


def foreign(rows: list, batch: dict) -> list[bool]:
    """For each mismatched row, whether its response is that of a batch row with another prompt."""
    own = [split_row(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    return [any(r == response and p != prompt for p, r in own) for prompt, response in rows]


def mismatched_rows(module: KTOModule, batch: dict, split: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (prompt, response) rows the step's policy pass sees for the mismatched pairs."""
    seen = []
    logps = module.policy.logps

    def spy(b: dict, **kwargs):
        seen.append(b)
        return logps(b, **kwargs)

    module.policy.logps = spy  # type: ignore[method-assign]
    try:
        module.compute_loss(batch, split)  # type: ignore[arg-type]
    finally:
        module.policy.logps = logps  # type: ignore[method-assign]
    assert len(seen) in (1, 2)  # the matched rows, then the mismatched ones (if any)
    kl = seen[1] if len(seen) == 2 else {"input_ids": torch.zeros(0, 1), "labels": torch.zeros(0, 1)}
    return [split_row(ids, labels) for ids, labels in zip(kl["input_ids"], kl["labels"])]


def test_validation_batches_of_pairs_pair_no_prompt_with_its_own_answer() -> None:
    data, module = pair_data(batch_size=8), kto()
    batch = next(iter(data.val_dataloader()))
    assert batch["score"].tolist()[:4] == [1.0, 0.0, 1.0, 0.0]  # chosen and rejected side by side
    rows = mismatched_rows(module, batch, "val")
    assert [prompt for prompt, _ in rows] == [split_row(*row)[0] for row in zip(batch["input_ids"], batch["labels"])]
    assert foreign(rows, batch) == [True] * len(batch["input_ids"])  # every row: another prompt's answer


def test_shuffled_training_batches_pair_no_prompt_with_its_own_answer() -> None:
    data, module = pair_data(batch_size=6), kto()
    for batch in data.train_dataloader():
        rows = mismatched_rows(module, batch, "train")
        assert foreign(rows, batch) == [True] * len(batch["input_ids"])


def test_a_prompt_truncated_differently_for_its_two_answers_is_still_one_prompt(tmp_path: Path) -> None:
    """A long prompt is cut for its long answer only: its samples' prompt tokens differ, the prompt not."""
    long_prompt = "".join(f"\n\nHuman: question {i}?\n\nAssistant: answer {i}." for i in range(4)) + "\n\nHuman: Tea?"
    records = [
        {
            "prompt": long_prompt,
            "chosen": "Yes.",
            "rejected": "No, never, not ever, under no circumstances at all, no.",
        },
        {"prompt": "How do I bake bread?", "response": "Knead, rise, bake.", "score": 1},
        {"prompt": "Can you help me?", "response": "Sure.", "score": 0},
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = PointwiseDataModule(
        train="demo://binary?n=8", val=str(path), max_length=48, max_prompt_length=16, batch_size=4
    )
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    rows = [split_row(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    assert rows[0][0] != rows[1][0] and rows[0][0][-16:] == rows[1][0][-16:]  # one prompt, cut for the long answer
    texts = [data.examples["val"][int(i)].prompt for i in batch["index"]]
    assert len(data.examples["val"]) == len(data.datasets["val"]) == 4
    kl = mismatched_rows(kto(), batch, "val")
    assert len(kl) == 4
    for text, (_, response) in zip(texts, kl):  # row i's prompt, with a response that answers another prompt
        sources = [i for i, (_, own) in enumerate(rows) if own[: len(response)] == response]
        assert sources and all(texts[i] != text for i in sources)


def test_a_batch_whose_rows_share_one_prompt_keeps_the_previous_estimate() -> None:
    data, module = pair_data(batch_size=8), kto()
    items = data.datasets["val"].items[:2]  # one record: chosen and rejected of one prompt
    batch = data.collator([dict(item) for item in items])
    module.kl = torch.tensor(0.25)  # the estimate of an earlier step
    assert mismatched_rows(module, batch, "val") == []  # no mismatched pair to form
    out = module.compute_loss(batch, "val")
    assert torch.isfinite(out.loss) and module.kl.item() == 0.25 and out.metrics["kl"].item() == 0.25


def test_precomputed_partners_never_share_the_prompt() -> None:
    data, module = pair_data(batch_size=8), kto("precomputed")
    module._trainer = SimpleNamespace(datamodule=data)  # prepare_precompute reads only the data module
    for split in ("train", "val"):
        module.prepare_precompute(split)
        partner = data.datasets[split].extra["kl_partner"].tolist()
        prompts = [e.prompt for e in data.examples[split]]
        assert len(prompts) == len(partner)  # one example per sample (none dropped)
        assert sorted(partner) == list(range(len(partner)))  # a permutation
        assert all(prompts[j] != prompts[i] for i, j in enumerate(partner)), split


def test_the_reused_estimate_survives_a_checkpoint() -> None:
    """Exact resume: a resumed run's first step without mismatched pairs uses the saved estimate."""
    data, module = pair_data(batch_size=8), kto()
    batch = data.collator([dict(data.datasets["val"].items[0])] * 2)  # one prompt, desirable only
    with torch.no_grad():  # move the policy away from its reference, so that the loss depends on z0
        for p in module.policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    module.kl = torch.tensor(0.25)
    checkpoint: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    resumed = kto()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert resumed.compute_loss(batch, "train").loss.item() == pytest.approx(
        module.compute_loss(batch, "train").loss.item(), abs=1e-6
    )
    assert resumed.kl.item() == 0.25 and module.kl.item() == 0.25


@pytest.mark.parametrize("seed", range(20))
def test_mismatched_partners_on_random_groups(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    groups = [rng.randrange(rng.randint(1, n)) for _ in range(n)]
    largest = max(groups.count(g) for g in set(groups))
    partner = mismatched_partners(groups, torch.Generator().manual_seed(seed) if seed % 2 else None).tolist()
    if len(set(groups)) == 1:  # one prompt: no mismatched pair exists
        assert partner == [-1] * n
        return
    assert all(0 <= j < n and groups[j] != groups[i] for i, j in enumerate(partner))
    if 2 * largest <= n:
        assert sorted(partner) == list(range(n))  # each response used once
    # distinct prompts in first-appearance order: row i takes row i - 1, as before
    assert mismatched_partners([3, 1, 2]).tolist() == [2, 0, 1]
