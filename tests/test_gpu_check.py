"""scripts/gpu_check.py on CPU (tiny model, FSDP2): the parts that do not need a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_of_a_step_follows_the_documented_formula() -> None:
    gpu_check = _module()
    # Qwen2.5-0.5B: 0.49B parameters, 0.36B of them outside the (tied) embeddings
    assert 0.35e9 < gpu_check.body_parameters(gpu_check.QWEN25_05B) < 0.37e9
    # SmolLM2-135M: 134.5M parameters, 28.3M of them the (tied) 49152 x 576 embedding
    assert 106.0e6 < gpu_check.body_parameters(gpu_check.SMOLLM2_135M) < 106.4e6
    config = {"hidden_size": 4, "num_hidden_layers": 2, "vocab_size": 10}
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 3, -100, -100]]),
        "score": torch.tensor([1.0, 0.0]),
    }
    body = 100
    per_token = 6 * body + 12 * 2 * 4 * 5
    policy = 8 * per_token + 5 * 6 * 4 * 10  # 8 tokens, 5 response tokens
    reference = 3 * (2 * body + 4 * 2 * 4 * 5) + 2 * 2 * 4 * 10  # the negative row: 3 tokens, 2 responses
    assert gpu_check.step_flops(batch, body=body, config=config) == policy + reference


@pytest.mark.integration
def test_gpu_check_runs_fsdp2_on_cpu_with_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "fsdp2.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    args = ["--strategy", "fsdp2", "--model", "tiny", "--accelerator", "cpu", "--precision", "32-true", "--steps", "4",
            "--warmup", "1", "--batch-size", "2", "--max-length", "64", "--words", "30", "--out", str(out),
            "--check-export"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[gpu_check] fsdp2 tiny qwen2" in result.stdout and "tokens/s" in result.stdout
    numbers = json.loads(out.read_text())
    assert numbers["timed_steps"] == 3 and numbers["losses_finite"]
    assert numbers["export_matches"] is True  # sharded FSDP2 checkpoint -> ulma export -> same weights
    assert numbers["tokens_per_second"] > 0 and numbers["model_tflops_per_second"] > 0
    shell = subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr
