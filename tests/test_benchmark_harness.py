"""The benchmark harness's own pieces: allocator discovery and environments, the memory cap that
turns running out into a result, bench-B's search and report, the generation token count.

Nothing here is timed; the memory-cap tests start one small child process each (about a second).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import allocator, bench_b, capped
from benchmarks.bench_a import with_allocators
from benchmarks.bench_generate import generated_tokens
from benchmarks.rows import Row


def test_find_jemalloc_from_ldconfig_then_the_usual_paths(tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    listing = f"	libz.so.1 (libc6,x86-64) => /lib/libz.so.1\n	libjemalloc.so.2 (libc6,x86-64) => {lib}\n"
    assert allocator.find_jemalloc(listing, candidates=(), environ={}) == str(lib)
    assert allocator.find_jemalloc("", candidates=(str(tmp_path / "absent.so"), str(lib)), environ={}) == str(lib)
    assert allocator.find_jemalloc("", candidates=(str(tmp_path / "absent.so"),), environ={}) is None
    assert allocator.find_jemalloc("", candidates=(), environ={"ULMA_BENCH_JEMALLOC": str(lib)}) == str(lib)


def test_resolve_measures_the_default_only_and_says_why_when_jemalloc_is_absent() -> None:
    assert allocator.resolve("both", "/x/libjemalloc.so.2") == (["default", "jemalloc"], None)
    settings, note = allocator.resolve("both", None)
    assert (
        settings == ["default"] and note is not None and "not found" in note and "apt-get install libjemalloc2" in note
    )
    assert allocator.resolve("jemalloc", None)[0] == ["default"]
    assert allocator.resolve("default", None) == (["default"], None)
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.resolve("tcmalloc", None)


def test_environment_preloads_jemalloc_first_and_default_takes_it_out() -> None:
    base = {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}
    env = allocator.environment("jemalloc", "/lib/libjemalloc.so.2", base)
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /opt/other.so"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1" and env["PATH"] == "/bin"
    back = allocator.environment("default", "/lib/libjemalloc.so.2", env)
    assert back["LD_PRELOAD"] == "/opt/other.so" and "MALLOC_CONF" not in back
    assert "LD_PRELOAD" not in allocator.environment("default", None, {"LD_PRELOAD": "/lib/libjemalloc.so.2"})
    with pytest.raises(FileNotFoundError, match="not found"):
        allocator.environment("jemalloc", None, base)
    assert base == {"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}  # not modified


def test_applied_sets_and_restores_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    import os

    with allocator.applied("jemalloc", "/lib/libjemalloc.so.2"):
        assert os.environ["LD_PRELOAD"] == "/lib/libjemalloc.so.2"
        assert os.environ["MALLOC_CONF"] == allocator.MALLOC_CONF
    assert "LD_PRELOAD" not in os.environ and os.environ["MALLOC_CONF"] == "narenas:1"


def test_loaded_reads_the_process_maps() -> None:
    assert allocator.loaded("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n") == "jemalloc"
    assert allocator.loaded("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n") == "default"


def test_with_allocators_runs_each_row_once_per_setting_of_its_library() -> None:
    groups = with_allocators(
        [[Row("trl", "kto"), Row("ours", "ulma")]], {"trl": ["default", "jemalloc"], "ours": ["default"]}
    )
    assert [r.name for r in groups[0]] == ["TRL kto fp32", "TRL kto fp32 jemalloc", "ulma-lightning ulma fp32"]


def test_memory_cap_turns_running_out_into_a_result() -> None:
    result = capped.run_capped(capped.hog, 4000, cap_bytes=200 * 1024**2, timeout_s=120)
    assert result["out_of_memory"] is True
    assert result["error"].startswith("ran out of memory at 0.")
    assert "cap 0.2 GiB" in result["error"]
    assert 0.19 < result["peak_rss_gib"] < 1.0


def test_memory_cap_lets_a_small_run_finish() -> None:
    result = capped.run_capped(capped.hog, 32, cap_bytes=2 * 1024**3, timeout_s=120)
    assert "error" not in result and result["touched_mb"] == 32


def test_allocation_failure_in_the_child_is_out_of_memory() -> None:
    assert capped.is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"
        )
    )
    assert capped.is_out_of_memory(MemoryError())
    assert not capped.is_out_of_memory(ValueError("bad shape"))


def _fits(row: bench_b.BRow, peak: float) -> dict[str, Any]:
    return {"row": row.__dict__, "name": row.name, "s_per_step": 1.0, "tokens_per_s": 1.0, "peak_rss_gib": peak}


def _oom(row: bench_b.BRow) -> dict[str, Any]:
    return {"row": row.__dict__, "name": row.name, "out_of_memory": True, "error": "ran out of memory at 22.0 GiB"}


def test_find_max_length_extrapolates_measured_peaks_to_the_cap() -> None:
    tried: list[bench_b.BRow] = []

    def run(row: bench_b.BRow) -> dict[str, Any]:  # peak 10 GiB + 5 MiB per token: 22 GiB at 2,457 tokens
        tried.append(row)
        peak = 10 + 0.005 * row.max_length
        return _fits(row, peak) if peak <= 22 else _oom(row)

    base = bench_b.BRow("ours", warmup=1)
    found = bench_b.find_max_length(base, run, 22.0, limit=32768, resolution=256, first=_fits(base, 10 + 0.005 * 1024))
    assert [r.max_length for r in tried] == [2048, 2304, 2560]  # the row at 1024 is not probed again
    assert found["max_length"] == 2304 and found["first_failing"] == 2560 and found["stopped"] is None
    assert all(
        r.impl == "ours" and r.warmup == 1 and r.warmup_length == bench_b.PROBE_WARMUP_LENGTH and r.measured == 1
        for r in tried
    )


def test_find_max_length_bisects_where_the_extrapolation_overshoots() -> None:
    tried: list[int] = []

    def run(row: bench_b.BRow) -> dict[str, Any]:  # a flat peak, then out of memory: no slope to follow
        tried.append(row.max_length)
        return _fits(row, 1.0) if row.max_length <= 1500 else _oom(row)

    found = bench_b.find_max_length(bench_b.BRow("ours"), run, 22.0, limit=32768, resolution=256)
    assert tried == [1024, 2048, 1536, 1280]
    assert found["max_length"] == 1280 and found["first_failing"] == 1536 and found["stopped"] is None


def test_find_max_length_halves_when_the_first_length_does_not_fit() -> None:
    tried: list[int] = []

    def run(row: bench_b.BRow) -> dict[str, Any]:
        tried.append(row.max_length)
        return _fits(row, 1.0) if row.max_length <= 300 else _oom(row)

    base = bench_b.BRow("ours")
    found = bench_b.find_max_length(base, run, 22.0, limit=32768, resolution=128, first=_oom(base))
    assert tried == [512, 256, 384]
    assert found["max_length"] == 256 and found["first_failing"] == 384


def test_find_max_length_stops_on_a_failure_that_is_not_memory() -> None:
    def run(row: bench_b.BRow) -> dict[str, Any]:
        return (
            {"row": {}, "name": row.name, "error": "no result within 60 s"}
            if row.max_length > 1024
            else _fits(row, 1.0)
        )

    found = bench_b.find_max_length(bench_b.BRow("ours"), run, 22.0, limit=32768, resolution=256)
    assert found["max_length"] == 1024 and found["stopped"] == "no result within 60 s"


def test_probe_warms_up_on_short_sequences_then_measures_the_length() -> None:
    row = bench_b.probe_row(bench_b.BRow("ours", max_length=1024), 4096)
    items = bench_b.samples(row, first_id=10)
    assert [len(s.prompt_ids) + len(s.response_ids) for s in items] == [bench_b.PROBE_WARMUP_LENGTH] * 8 + [4096] * 8
    assert [s.score for s in items[:4]] == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.integration
def test_bench_b_resume_reuses_what_a_killed_run_saved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[bench_b.BRow] = []

    def killed_after_three(row: bench_b.BRow, *args: Any) -> dict[str, Any]:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(row)
        return (
            {"row": bench_b.asdict(row), **_fits(row, 10 + 0.005 * row.max_length)}
            if row.impl == "ours"
            else {"row": bench_b.asdict(row), **_oom(row)}
        )

    monkeypatch.setattr(
        bench_b,
        "machine",
        lambda: {"cpu": "test", "cores": 2, "memory_gib": 24.0, "torch": "t", "transformers": "x", "trl": "y"},
    )
    monkeypatch.setattr(bench_b, "run_row", killed_after_three)
    argv = ["--layers", "2", "--find-max-length", "--memory-cap-gib", "22", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench_b.main(argv)
    saved = json.loads((tmp_path / "benchmarks-b.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [
        c.name for c in calls[:2]
    ]  # both rows and the first probe were on disk before the kill
    assert [p["row"]["max_length"] for p in saved["max_length_search"]["probes"]] == [2048]
    assert not (tmp_path / "benchmarks-b.md").exists()
    assert bench_b.main(["--report", "--out", str(tmp_path)]) == 0
    assert (
        "**The search did not finish** (the run was stopped; `--resume` goes on): so far ULMA trains at 2048."
        in (tmp_path / "benchmarks-b.md").read_text()
    )

    again: list[int] = []

    def rest(row: bench_b.BRow, *args: Any) -> dict[str, Any]:
        assert row.impl == "ours" and row.warmup_length == bench_b.PROBE_WARMUP_LENGTH and row.max_length != 2048, (
            "a saved row was measured again"
        )
        again.append(row.max_length)
        peak = 10 + 0.005 * row.max_length
        return {"row": bench_b.asdict(row), **(_fits(row, peak) if peak <= 22 else _oom(row))}

    monkeypatch.setattr(bench_b, "run_row", rest)
    assert bench_b.main([*argv, "--resume"]) == 0
    assert again == [2304, 2560]
    text = (tmp_path / "benchmarks-b.md").read_text()
    assert "- 2304 tokens, to 256 tokens" in text and "first failing: 2560" in text and "did not finish" not in text
    assert "(3 result(s) reused from an earlier run with --resume" in text


def test_bench_b_report_needs_a_result_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench_b.main(["--report", "--out", str(tmp_path)])


def test_bench_b_report_records_out_of_memory() -> None:
    ours, trl = bench_b.BRow("ours"), bench_b.BRow("trl")
    data = {
        "command": "PYTHONPATH=. python -m benchmarks.bench_b",
        "date": "2026-01-01",
        "machine": {"cpu": "test cpu", "cores": 2, "memory_gib": 24.0, "torch": "t", "transformers": "x", "trl": "y"},
        "cap_gib": 22.0,
        "settings": {},
        "rows": [
            {"row": ours.__dict__, "name": ours.name, "s_per_step": 150.0, "tokens_per_s": 54.6, "peak_rss_gib": 12.5},
            {
                "row": trl.__dict__,
                "name": trl.name,
                "out_of_memory": True,
                "error": "ran out of memory at 22.0 GiB (killed by the benchmark's memory cap; cap 22.0 GiB)",
                "peak_rss_gib": 22.0,
            },
        ],
        "max_length_search": {
            "max_length": 4096,
            "first_failing": 8192,
            "limit": 32768,
            "resolution": 256,
            "stopped": None,
            "probes": [],
        },
        "notes": [],
        "wall_s": 600.0,
    }
    text = bench_b.markdown(data)
    assert "the full Qwen2.5-0.5B shape" in text
    assert "| ulma-lightning ULMA L=1024 +checkpointing | 1024 | 150.00 | 55 | 12.50 | default |" in text
    assert "| TRL KTOTrainer L=1024 +checkpointing | 1024 | out of memory: ran out of memory at 22.0 GiB" in text
    assert "- 4096 tokens, to 256 tokens" in text and "first failing: 8192" in text
    assert "ULMA against KTOTrainer" not in text  # no ratio against a row that has no result
    data["rows"][0]["row"] = {**ours.__dict__, "layers": 2}
    assert "**2 layers, not the full 24: a smoke run**" in bench_b.markdown(data)


def test_generated_tokens_count_up_to_the_first_eos() -> None:
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert generated_tokens(ids, eos=2) == 3 + 5 + 1


# ------------------------------------------------------------------ bench-C
def _hh_file(path: Path, n: int = 12) -> Path:
    import gzip

    records = [
        {
            "chosen": (
                f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: Dig a hole, set the tree in it and water it well."
            ),
            "rejected": f"\n\nHuman: How do I plant tree {i}?\n\nAssistant: No.",
        }
        for i in range(n)
    ]
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _tiny_model_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ulma_lightning.tokenizers import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_bench_c_smoke_runs_every_row_and_writes_its_report(tmp_path: Path) -> None:
    from benchmarks import bench_c

    model, data, out = _tiny_model_folder(tmp_path / "model"), _hh_file(tmp_path / "hh.jsonl.gz"), tmp_path / "out"
    assert bench_c.main(["--smoke", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "benchmarks-c.json").read_text())
    assert [r["name"] for r in result["rows"]] == [
        "ulma-lightning ULMA full",
        "ulma-lightning ULMA LoRA r16",
        "TRL KTOTrainer full",
        "TRL KTOTrainer LoRA r16",
    ]
    for r in result["rows"]:
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["achieved_flops"] > 0 and len(r["losses"]) == 1
        assert r["row"]["layers"] == 1 and r["row"]["max_length"] == 64
    assert set(result["summary"]["ratios"]) == {"full", "lora"} and set(result["summary"]["mfu"]) == {
        "ours full",
        "ours lora",
        "trl full",
        "trl lora",
    }
    text = (out / "benchmarks-c.md").read_text()
    assert "a smoke run: the first 1 layers only" in text and "| TRL KTOTrainer LoRA r16 | default |" in text
    assert "KTOTrainer's tokens/s" in text and "OMP_NUM_THREADS" in text


def test_bench_c_counts_flops_per_method_and_takes_each_rows_fastest_allocator() -> None:
    from benchmarks import bench_c
    from benchmarks.workload import Sample

    config = {
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "vocab_size": 32,
    }
    batch = [Sample([1, 2, 3], [4, 5], score=1.0), Sample([1, 2], [6, 7, 8], score=0.0)]
    ulma = bench_c.step_flops(config, bench_c.CRow("ours"), batch)
    kto = bench_c.step_flops(config, bench_c.CRow("trl"), batch)
    ulma_lora = bench_c.step_flops(config, bench_c.CRow("ours", lora=True), batch)
    assert kto > ulma > ulma_lora > 0  # KTO: reference on every row plus KL rows; LoRA: no frozen-weight gradients
    from benchmarks.flops import Seq, forward_flops

    assert ulma - ulma_lora == pytest.approx(forward_flops(config, [Seq(5, 2, True), Seq(5, 3, False)]))
    rows = [
        {"row": {"impl": "ours", "allocator": "default"}, "name": "a", "tokens_per_s": 10.0},
        {"row": {"impl": "ours", "allocator": "jemalloc"}, "name": "b", "tokens_per_s": 12.0},
        {"row": {"impl": "ours", "lora": True}, "name": "c", "error": "boom"},
    ]
    assert {k: r["name"] for k, r in bench_c.best(rows).items()} == {"ours full": "b"}


def test_bench_c_without_the_model_folder_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import bench_c

    assert bench_c.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 0
    assert "scripts/get_smollm2.py" in capsys.readouterr().out
    assert not (tmp_path / "benchmarks-c.md").exists()
