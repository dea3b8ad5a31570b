"""Scale-out end to end, on CPU with gloo, each run a `ulma fit` subprocess (tiny model, 8 steps).

Runs (each made once per module, on demand; 24 training samples, 3 validation samples):
  single        1 process, batch 2, accumulate_grad_batches 2 (a global batch of 4 per step),
                reference: copy
  ddp           2 processes (DDP), batch 2 each, reference: precomputed (before training, each
                process computes a share and the shares are summed)
  fsdp2         2 processes (FSDP2 through ModelParallelStrategy), batch 2 each, reference: copy
                (sharded like the policy); sharded checkpoint folders
  killed_single `single`, SIGKILLed when step 4 starts (after the step-3 checkpoint was written),
                then resumed with --ckpt_path last
  killed_fsdp2  2-process FSDP2 with reference: precomputed (computed in unequal shares: 3
                validation samples on 2 processes, eval_batch_size 1), killed and resumed the same
                way from its sharded checkpoint
  fsdp2_lora    2-process FSDP2, LoRA adapters, reference: adapter (the policy without adapters)

Under DDP/FSDP2 each process computes ULMA's subset means over its own batch and the gradients are
averaged: exactly one process accumulating the processes' batches as micro-batches (the sampler
gives process r the r-th micro-batch of every step), which is the equivalence these tests check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, TINY_LLAMA

STEPS = 8  # 24 samples / (2 x 2) = 6 steps per epoch: the runs cross into a second epoch
KILL_AT = 3
TIMEOUT = 300


def _config(root: Path, strategy: str, reference: str) -> dict[str, Any]:
    trainer: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": STEPS,
        "max_epochs": 2,  # with max_epochs, the LR schedule's step count is estimated before a restore
        "precision": "32-true",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
        "callbacks": [
            {
                "class_path": "ulma_lightning.checkpointing.AtomicModelCheckpoint",
                "init_args": {
                    "dirpath": str(root / "ckpt"),
                    "save_last": True,
                    "save_top_k": 0,
                    "every_n_train_steps": 1,
                },
            },
            {"class_path": "dist_recorder.Recorder", "init_args": {"out": str(root / "rec")}},
            {"class_path": "ulma_lightning.callbacks.HFExport", "init_args": {"dirname": str(root / "hf_model")}},
        ],
    }
    if strategy == "single":
        trainer["accumulate_grad_batches"] = 2
    elif strategy == "ddp":
        trainer["devices"] = 2
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy"}
    elif strategy == "fsdp2":
        trainer["devices"] = 2
        trainer["strategy"] = {"class_path": "ulma_lightning.sharding.FSDP2Strategy"}
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "class_path": "ulma_lightning.ULMAModule",
            "init_args": {
                "policy": {
                    "model_config": {**TINY_LLAMA, "tie_word_embeddings": True},
                    "tokenizer": "builtin:demo",
                    "reference": reference,
                },
                "optimizer": {"lr": 0.01, "warmup_steps": 0, "schedule": "constant"},
            },
        },
        "data": {
            "class_path": "ulma_lightning.PointwiseDataModule",
            "init_args": {
                "train": "demo://binary",
                "max_samples": 27,
                "val_fraction": 0.11,
                "max_length": 64,
                "batch_size": 2,
                "eval_batch_size": 1,
            },
        },
    }


RUNS = {  # name: (strategy, reference, killed and resumed)
    "single": ("single", "copy", False),
    "ddp": ("ddp", "precomputed", False),
    "fsdp2": ("fsdp2", "copy", False),
    "killed_single": ("single", "copy", True),
    "killed_fsdp2": ("fsdp2", "precomputed", True),
    "fsdp2_lora": ("fsdp2", "adapter", False),
}


def _fit(root: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "RANK")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    if kill_at is not None:
        env["ULMA_TEST_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, "-m", "ulma_lightning.cli", "fit", "--config", str(root / "config.yaml"), *extra]
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=TIMEOUT)


class Runs:
    """The subprocess runs, each made once and on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}
        self.ids_before_kill: dict[str, list[list[int]]] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.done:
            strategy, reference, kill = RUNS[name]
            path = self.root / name
            shutil.rmtree(path, ignore_errors=True)  # a failed earlier attempt
            path.mkdir(parents=True)
            config = _config(path, strategy, reference)
            if reference == "adapter":
                config["model"]["init_args"]["policy"]["lora"] = {"r": 4, "alpha": 8}
            (path / "config.yaml").write_text(yaml.safe_dump(config))
            if kill:
                result = _fit(path, kill_at=KILL_AT)
                assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
                self.ids_before_kill[name] = _ids(path)
                assert not (path / "rec" / "weights.rank0.pt").exists()
                result = _fit(path, "--ckpt_path", "last")
            else:
                result = _fit(path)
            assert result.returncode == 0, result.stderr[-3000:]
            self.done[name] = path
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("scale"))


def _ids(run: Path, rank: int = 0) -> list[list[int]]:
    return [json.loads(line) for line in (run / "rec" / f"ids.rank{rank}.jsonl").read_text().splitlines()]


def _weights(run: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(run / "rec" / f"weights.rank{rank}.pt")


def _stats(run: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((run / "rec" / f"stats.rank{rank}.json").read_text())


def _reference_samples(run: Path, rank: int) -> int:
    return _stats(run, rank)["reference_forward_samples"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def _initial_weights() -> dict[str, torch.Tensor]:
    from ulma_lightning.policy import Policy, PolicyConfig

    policy = Policy(
        PolicyConfig(
            model_config={**TINY_LLAMA, "tie_word_embeddings": True}, tokenizer="builtin:demo", reference="none"
        )
    )
    policy.build()
    return policy.model.state_dict()


@pytest.mark.parametrize("run", ["ddp", "fsdp2"])
def test_two_processes_equal_one_process_accumulating_the_same_global_batch(runs: Runs, run: str) -> None:
    single, multi = runs["single"], runs[run]
    micro = _ids(single)
    assert len(micro) == 2 * STEPS
    for rank in (0, 1):  # process r's k-th batch is micro-batch 2k + r of the single run
        assert _ids(multi, rank) == micro[rank::2]
    rank0, rank1 = _weights(multi, 0), _weights(multi, 1)
    _assert_close(rank0, rank1)  # the ranks end with identical weights
    _assert_close(rank0, _weights(single))  # ddp: precomputed reference values = the copy's
    if run == "ddp":  # each process precomputed its share: 12 of 24 train, 2 of 3 val (one padded),
        # and 14 of the 27 test samples (data.test defaults to the demo's test split)
        assert [_reference_samples(multi, rank) for rank in (0, 1)] == [28, 28]
        assert _stats(multi)["reference"] is None  # freed once the values were computed
    else:  # FSDP2: the copy reference is sharded like the policy
        assert _stats(multi)["policy"] == _stats(multi)["reference"] == "fsdp2"
    initial = _initial_weights()
    assert max((rank0[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it did train


@pytest.mark.parametrize("run", ["killed_single", "killed_fsdp2"])
def test_killed_fit_resumes_mid_epoch_with_the_unseen_samples_and_ends_equal(runs: Runs, run: str) -> None:
    single, killed = runs["single"], runs[run]
    micro = _ids(single)
    ranks = 2 if run.endswith("fsdp2") else 1
    before = runs.ids_before_kill[run]  # rank 0's batches of the steps finished before the kill
    assert len(before) == 2 * KILL_AT // ranks
    for rank in range(ranks):
        seen = _ids(killed, rank)  # the resumed run appends to the same record
        assert seen == micro[rank::ranks]  # the rest of epoch 0 in order, then epoch 1, nothing repeated
    assert _ids(killed)[: len(before)] == before
    assert sorted(i for batch in micro[:12] for i in batch) == list(range(24))  # epoch 0: every sample once
    _assert_close(_weights(killed), _weights(single))
    if run == "killed_fsdp2":  # the resumed run took the precomputed values from the checkpoint
        assert [_reference_samples(killed, rank) for rank in (0, 1)] == [0, 0]
    assert not list((killed / "ckpt").glob(".*"))  # no partial or old checkpoint left behind


def _hf_logits(folder: Path) -> torch.Tensor:
    from dist_recorder import FIXED_INPUT
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=FIXED_INPUT).logits.float()


@pytest.mark.parametrize("run", ["ddp", "fsdp2", "fsdp2_lora"])
def test_hf_export_callback_writes_the_trained_policy(runs: Runs, run: str) -> None:
    """HFExport at the end of fit: under FSDP2 the processes gather the weights, rank 0 writes."""
    path = runs[run]
    torch.testing.assert_close(
        _hf_logits(path / "hf_model"), torch.load(path / "rec" / "logits.pt"), rtol=1e-5, atol=1e-5
    )


@pytest.mark.integration
@pytest.mark.parametrize("run", ["single", "fsdp2"])
def test_export_gives_the_logits_of_the_trained_module(runs: Runs, run: str, tmp_path: Path) -> None:
    """`ulma export` of the last checkpoint (a file; a sharded FSDP2 folder) loads with from_pretrained
    and gives the logits the module computed at the end of its fit."""
    from ulma_lightning.cli import main

    path = runs[run]
    ckpt = path / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() == (run == "fsdp2")
    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    expected = torch.load(path / "rec" / "logits.pt")
    torch.testing.assert_close(_hf_logits(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_export_keeps_or_merges_lora_adapters_from_a_sharded_checkpoint(runs: Runs, tmp_path: Path) -> None:
    from dist_recorder import FIXED_INPUT
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from ulma_lightning.cli import main

    path = runs["fsdp2_lora"]
    assert _stats(path)["policy"] == "fsdp2" and _stats(path)["reference"] is None  # adapters off = reference
    expected = torch.load(path / "rec" / "logits.pt")
    ckpt = str(path / "ckpt" / "last.ckpt")
    adapter = main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "adapter"), "--keep-adapter"])
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    with torch.no_grad():
        logits = AutoPeftModelForCausalLM.from_pretrained(adapter)(input_ids=FIXED_INPUT).logits.float()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    merged = main(["export", "--ckpt", ckpt, "--out", str(tmp_path / "merged")])
    assert not (merged / "adapter_config.json").exists()
    torch.testing.assert_close(_hf_logits(merged), expected, rtol=1e-5, atol=1e-5)
    initial = _initial_weights()  # the adapters trained: the merged weights moved
    merged_state = load_file(merged / "model.safetensors")
    assert max((merged_state[k].float() - initial[k]).abs().max().item() for k in merged_state if k in initial) > 1e-4
