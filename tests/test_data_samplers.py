"""The resumable, process-split training order (ulma_lightning.data.samplers)."""

from __future__ import annotations

import pytest
import torch

from ulma_lightning.data.samplers import ResumableDataLoader, ResumableSampler


def _batches(sampler: ResumableSampler) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


@pytest.mark.parametrize("lengths", [None, [i % 7 + 1 for i in range(23)]], ids=["shuffled", "length_grouped"])
def test_process_batches_are_the_micro_batches_of_one_process(lengths: list[int] | None) -> None:
    """Rank r's k-th batch on 2 processes is micro-batch 2k+r of one process with the same batch size
    (hence the global batch of one process with twice the batch size), for every epoch."""
    data = list(range(23))
    for epoch in (0, 1):
        single = ResumableSampler(data, 3, seed=5, lengths=lengths)
        single.set_epoch(epoch)
        micro = _batches(single)
        ranks = []
        for rank in (0, 1):
            sampler = ResumableSampler(data, 3, num_replicas=2, rank=rank, seed=5, lengths=lengths)
            sampler.set_epoch(epoch)
            assert len(list(sampler)) == len(sampler)
            ranks.append(_batches(sampler))
        assert len(ranks[0]) == len(ranks[1]) == 4  # ceil(23 / 6) steps
        for k in range(3):  # full global batches
            assert ranks[0][k] == micro[2 * k] and ranks[1][k] == micro[2 * k + 1]
        seen = sorted(i for r in ranks for b in r for i in b)
        assert set(seen) == set(data)  # every sample, the short last step padded to equal shares
        assert len(seen) == 24
    assert single.global_order(0) != single.global_order(1)


@pytest.mark.parametrize("lengths", [None, [i % 5 + 1 for i in range(20)]], ids=["shuffled", "length_grouped"])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_with_exactly_the_unseen_samples(lengths: list[int] | None, world: int) -> None:
    data = list(range(20))
    for rank in range(world):
        full = ResumableSampler(data, 2, num_replicas=world, rank=rank, seed=3, lengths=lengths)
        full.set_epoch(1)
        expected = _batches(full)
        state = full.state_dict(batches_done=2)
        assert state["consumed"] == 2 * 2 * world and state["epoch"] == 1

        resumed = ResumableSampler(data, 2, num_replicas=world, rank=rank, seed=3, lengths=lengths)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # what Lightning does before the epoch's iterator starts
        assert _batches(resumed) == expected[2:]
        assert len(resumed) == len(full)  # the epoch's length, for Lightning's batch count
        # the resume applies once: the next iteration of the epoch is whole again
        assert _batches(resumed) == expected


def test_resume_state_is_dropped_when_a_new_epoch_starts() -> None:
    data = list(range(10))
    sampler = ResumableSampler(data, 2, seed=0)
    sampler.load_state_dict({"epoch": 0, "consumed": 4, "global_batch": 2, "size": 10, "seed": 0})
    sampler.set_epoch(1)
    fresh = ResumableSampler(data, 2, seed=0)
    fresh.set_epoch(1)
    assert list(sampler) == list(fresh)
    # an epoch that had been consumed entirely resumes at the start of the next one
    done = ResumableSampler(data, 2, seed=0)
    done.load_state_dict({"epoch": 0, "consumed": 10, "global_batch": 2, "size": 10, "seed": 0})
    assert done.epoch == 1 and list(done) == list(fresh)


def test_resume_refuses_a_different_dataset() -> None:
    sampler = ResumableSampler(list(range(10)), 2)
    with pytest.raises(ValueError, match="11 samples"):
        sampler.load_state_dict({"epoch": 0, "consumed": 4, "global_batch": 2, "size": 11, "seed": 0})


def test_loader_state_follows_the_training_loop_not_the_prefetcher() -> None:
    data = [{"x": torch.tensor(i)} for i in range(12)]
    done = {"batches": 0}
    loader = ResumableDataLoader(
        data, batch_size=2, sampler=ResumableSampler(data, 2, seed=1), progress=lambda: done["batches"]
    )
    iterator = iter(loader)
    seen = [next(iterator)["x"].tolist() for _ in range(3)]  # fetched three, the loop consumed two
    done["batches"] = 2
    state = loader.state_dict()
    other = ResumableDataLoader(data, batch_size=2, sampler=ResumableSampler(data, 2, seed=1))
    other.load_state_dict(state)
    rest = [b["x"].tolist() for b in other]
    assert rest[0] == seen[2] and len(rest) == 4
    assert sorted(i for b in seen[:2] + rest for i in b) == list(range(12))


@pytest.mark.integration
@pytest.mark.parametrize(
    "trainer_args",
    [
        {"max_epochs": 3},
        {"max_epochs": 2, "accumulate_grad_batches": 3, "limit_train_batches": 0.5},
        {"max_epochs": 5, "max_steps": 7, "limit_train_batches": 4},
    ],
)
def test_planned_steps_match_lightnings_estimate(trainer_args: dict, tmp_path) -> None:
    """The schedule's step count (computed without building the train loader, see base.planned_steps)."""
    from conftest import TINY_LLAMA
    from lightning.pytorch import Callback, Trainer

    from ulma_lightning import PointwiseDataModule, PolicyConfig, ULMAModule

    seen = {}

    class Stop(Exception):
        pass

    class Compare(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            seen["planned"] = pl_module.planned_steps()
            seen["lightning"] = trainer.estimated_stepping_batches
            raise Stop  # nothing to train

    module = ULMAModule(PolicyConfig(model_config=TINY_LLAMA, tokenizer="builtin:demo"))
    data = PointwiseDataModule(train="demo://binary?n=50", batch_size=4)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Compare()], default_root_dir=tmp_path, **trainer_args,
    )  # fmt: skip
    with pytest.raises(Stop):
        trainer.fit(module, data)
    assert seen["planned"] == seen["lightning"] > 0
