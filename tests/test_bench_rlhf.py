"""The RLHF benchmark's harness (benchmarks/bench_rlhf.py), at smoke size: both sides of the GRPO row run
one timed step on a tiny model, each side's child process gets its allocator, the report names both.
Nothing here is timed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_LLAMA

from benchmarks import allocator, bench_rlhf


@pytest.fixture
def smoke_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(bench_rlhf, "MODEL", dict(TINY_LLAMA))
    monkeypatch.setattr(bench_rlhf, "PROMPTS", 2)
    monkeypatch.setattr(bench_rlhf, "NEW_TOKENS", 4)
    monkeypatch.setattr(bench_rlhf, "SOURCE", "demo://demonstration?n=16")
    folder = tmp_path / "model"
    bench_rlhf.save_model(folder)
    return folder


@pytest.mark.integration
def test_both_sides_of_the_grpo_row_run_a_step(smoke_size: Path) -> None:
    mine = bench_rlhf.run_side("ours", smoke_size, 1, "grpo")
    theirs = bench_rlhf.run_side("trl", smoke_size, 1, "grpo")
    for name in ("generate", "score", "logprobs", "reference", "update", "step", "tokens"):
        assert mine[name] > 0, name
    assert theirs["step"] > 0 and mine["allocator"] in allocator.SETTINGS
    lines = bench_rlhf.table("grpo", mine, theirs)
    assert lines[0].startswith("| GRPO step, 2 prompts x k=4, 4 new tokens")
    assert any(line.startswith("| TRL 1.16 GRPOTrainer step |") for line in lines)
    assert any(line.startswith("| ulma-lightning allocator |") for line in lines)


def test_each_side_runs_in_a_child_under_each_allocator_and_the_fastest_is_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []
    steps = {"default": 2.0, "jemalloc": 1.5}

    def fake_run(command, env, **kwargs):
        seen.append((command, env))
        setting = "jemalloc" if "jemalloc" in env.get("LD_PRELOAD", "") else "default"
        return subprocess.CompletedProcess(
            command, 0, stdout="noise\n" + json.dumps({"step": steps[setting], "allocator": setting}) + "\n", stderr=""
        )

    monkeypatch.setattr(bench_rlhf.subprocess, "run", fake_run)
    runs = [
        bench_rlhf.in_process("trl", tmp_path, 3, "grpo", s, "/opt/libjemalloc.so.2") for s in ("default", "jemalloc")
    ]
    assert bench_rlhf.best(runs) == {"step": 1.5, "allocator": "jemalloc"}
    (command, default_env), (_, jemalloc_env) = seen
    assert command[-8:] == ["--side", "trl", "--model", str(tmp_path), "--steps", "3", "--method", "grpo"]
    assert "jemalloc" not in default_env.get("LD_PRELOAD", "") and jemalloc_env["LD_PRELOAD"].startswith(
        "/opt/libjemalloc.so.2"
    )
    monkeypatch.setattr(
        bench_rlhf.subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, stdout="", stderr="boom"),
    )
    with pytest.raises(RuntimeError, match="trl under default failed:\nboom"):
        bench_rlhf.in_process("trl", tmp_path, 1, "grpo", "default", None)
