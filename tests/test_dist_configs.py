"""The shipped method configs on 2 CPU processes (gloo), as users run them, under DDP and FSDP2.

Under FSDP2 every forward of a sharded model all-gathers weights, so every process must run the
same forwards whatever its batch holds; a process that runs one more aborts the group (gloo:
"Received data size doesn't match expected size") or hangs it. Each run is the user's command line
``ulma fit --config configs/<method>.yaml --config configs/strategy/<ddp|fsdp2>.yaml
--trainer.accelerator cpu --trainer.devices 2 ...`` with overrides for speed only (3 steps, batch 4,
validation after step 3 on 2 batches), so validation, the checkpoint, the GenerationSamples table
and the HFExport of each config all run too.

* ``group``: one 2-process group (launched as torchrun would, ``tests/dist_runner.py``) runs the
  method configs (ulma, pointwise_dpo, dpo, kto, sft under both strategies; unlikelihood and
  reward under FSDP2), two runs on data built so that one process has no positives and the other
  no negatives (in training and validation), and ``ulma predict`` on a split the processes share
  unequally; the group's start-up is paid once.
* ``test_two_nodes_end_with_the_weights_of_one_node``: the issue's command as a ``ulma fit``
  subprocess (Lightning launches the second process), and the same run as two nodes of one process
  each (``NODE_RANK``, ``--trainer.num_nodes 2``), which end with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.integration  # every test here builds a Trainer

CONFIGS = REPO / "configs"
METHODS = ["ulma", "pointwise_dpo", "dpo", "kto", "sft"]
STRATEGIES = ["ddp", "fsdp2"]
MATRIX = [(m, s) for m in METHODS for s in STRATEGIES] + [("unlikelihood", "fsdp2"), ("reward", "fsdp2")]
STEPS, BATCH = 3, 4
FAST = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
    "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS), "--trainer.limit_val_batches", "2",
    "--data.init_args.batch_size", str(BATCH),
]  # fmt: skip
TIMEOUT = 600  # per group of processes; a hang (the bug) ends there


def _fit_argv(method: str, strategy: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / f"{method}.yaml"),
        "--config",
        str(CONFIGS / "strategy" / f"{strategy}.yaml"),
        *FAST,
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    drop = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


def _run_together(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, name: str) -> None:
    """Start the processes of one group, wait for all (killing all after TIMEOUT), check each exited 0."""
    logs = [cwd / f"{name}.{i}.log" for i in range(len(commands))]
    procs = []
    for (cmd, env), log in zip(commands, logs):
        with open(log, "w") as handle:
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            )
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and what it launched
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, (
            f"{name} process {logs.index(log)} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
        )


# ----------------------------------------------------------------------------- data
def _record(i: int, score: int) -> dict[str, Any]:
    words = ["water", "the", "plants", "every", "morning", "and", "keep", "them", "in", "sun"]
    return {"prompt": f"How do I keep plant {i} alive?", "response": " ".join(words[: 2 + (i * 3) % 9]), "score": score}


def _one_sided_data(folder: Path) -> None:
    """Training data where, at step 0, rank 0's batch is all positives and rank 1's all negatives
    (step 1 the reverse, step 2 mixed); validation data where rank 0 holds only positives, rank 1
    only negatives. The ranks' shares come from the library's own sampler (the one `ulma fit` uses)."""
    from ulma_lightning.data.samplers import ResumableSampler

    size = 2 * BATCH * STEPS
    scores = [0] * size
    for rank in (0, 1):
        mine = list(ResumableSampler(range(size), BATCH, num_replicas=2, rank=rank, seed=0))
        for step in range(STEPS):
            batch = mine[step * BATCH : (step + 1) * BATCH]
            for j, i in enumerate(batch):
                scores[i] = [int(rank == 0), int(rank == 1), j % 2][step]
    lines = [json.dumps(_record(i, s)) for i, s in enumerate(scores)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    # Lightning's DistributedSampler (no shuffle) gives rank r the samples r, r + 2, ...
    (folder / "val.jsonl").write_text("\n".join(json.dumps(_record(100 + i, 1 - i % 2)) for i in range(4)) + "\n")


# ----------------------------------------------------------------------------- the group
def _runs(folder: Path) -> list[dict[str, Any]]:
    runs = [{"name": f"{m}-{s}", "argv": _fit_argv(m, s)} for m, s in MATRIX]
    data = ["--data.init_args.train", str(folder / "train.jsonl"), "--data.init_args.val", str(folder / "val.jsonl")]
    runs += [{"name": f"{m}-one-sided", "argv": _fit_argv(m, "fsdp2", *data)} for m in ("ulma", "pointwise_dpo")]
    predict = ["predict", "--config", str(CONFIGS / "ulma.yaml"), "--config", str(CONFIGS / "strategy" / "fsdp2.yaml")]
    predict += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
    predict += ["--data.init_args.test", "demo://binary?split=test&n=9", "--data.init_args.eval_batch_size", "4"]
    runs.append({"name": "predict-fsdp2", "argv": predict})  # 9 prompts: Lightning's shares would be 5 and 4
    return runs


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dist_configs")
    _one_sided_data(folder)
    (folder / "runs.json").write_text(json.dumps(_runs(folder)))
    port = str(_free_port())
    cmd = [sys.executable, str(REPO / "tests" / "dist_runner.py"), str(folder / "runs.json")]
    ranks = [
        (
            cmd,
            _env(
                RANK=str(r), LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
        )
        for r in (0, 1)
    ]
    _run_together(ranks, folder, "group")
    return folder


def _results(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads((folder / name / f"result.rank{r}.json").read_text()) for r in (0, 1)]


def _assert_in_step(results: list[dict[str, Any]], strategy: str) -> None:
    for result in results:
        assert result["world_size"] == 2 and result["global_step"] == STEPS
        assert result["strategy"] == {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy]
        assert math.isfinite(result["metrics"]["val/loss"]) and math.isfinite(result["metrics"]["train/loss"])
    rank0, rank1 = results
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)  # the same weights on both ranks
    assert rank0["metrics"]["val/loss"] == rank1["metrics"]["val/loss"]  # synced across the ranks


@pytest.mark.parametrize(("method", "strategy"), MATRIX)
def test_shipped_config_trains_on_two_processes(group: Path, method: str, strategy: str) -> None:
    _assert_in_step(_results(group, f"{method}-{strategy}"), strategy)
    exported = group / f"{method}-{strategy}" / "runs" / method
    assert list(exported.glob("version_*/hf_model/model.safetensors"))  # HFExport after the fit


@pytest.mark.parametrize("method", ["ulma", "pointwise_dpo"])
def test_fsdp2_with_one_process_lacking_positives_and_the_other_negatives(group: Path, method: str) -> None:
    results = _results(group, f"{method}-one-sided")
    _assert_in_step(results, "fsdp2")
    for result in results:  # every process logged the positives' reward although one had none
        assert result["metrics"]["val/rewards/positive"] is not None
        assert result["metrics"]["val/rewards/negative"] is not None
    if method == "ulma":  # the reference skipped positives: per rank 4 + 2 training negatives, and in
        # validation (sanity check and after step 3) both of its 2 rows; idle forwards do not count
        assert [r["reference_forward_samples"] for r in results] == [4 + 2 + 2 + 2, 4 + 2 + 2 + 2]


def test_fsdp2_predict_on_unequal_shares_writes_every_prompt_once(group: Path) -> None:
    rows = [
        json.loads(line)
        for line in next(group.glob("predict-fsdp2/runs/ulma/version_*/predictions.jsonl")).read_text().splitlines()
    ]
    assert sorted(row["index"] for row in rows) == list(range(9))


def test_two_nodes_end_with_the_weights_of_one_node(group: Path, tmp_path: Path) -> None:
    """Multi-node through Lightning: each node runs the same command with its NODE_RANK."""
    from safetensors.torch import load_file

    module = [sys.executable, "-m", "ulma_lightning.cli"]
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    one_node.mkdir(), two_nodes.mkdir()
    _run_together([(module + _fit_argv("ulma", "fsdp2"), _env())], one_node, "one_node")
    port = str(_free_port())
    per_node = module + _fit_argv("ulma", "fsdp2", "--trainer.num_nodes", "2", "--trainer.devices", "1")
    nodes = [
        (per_node, _env(NODE_RANK=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")) for n in (0, 1)
    ]
    _run_together(nodes, two_nodes, "two_nodes")
    exported = [
        load_file(next(run.glob("runs/ulma/version_*/hf_model/model.safetensors"))) for run in (one_node, two_nodes)
    ]
    exported.append(load_file(next(group.glob("ulma-fsdp2/runs/ulma/version_*/hf_model/model.safetensors"))))
    initial = exported[0].keys()
    for other in exported[1:]:
        assert other.keys() == initial
        for key in initial:
            torch.testing.assert_close(
                other[key], exported[0][key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )
