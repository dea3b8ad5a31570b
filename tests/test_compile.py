"""``policy.compile`` (issue 13, item 1): the transformer blocks through ``torch.compile``.

One real inductor test (loss and gradients equal eager); the other tests check the wiring with the
``aot_eager`` backend (same tracing, no code generation: fast on CPU): ``ulma fit`` with the option,
checkpoint keys equal eager's, resume, ``ulma export``, LoRA (adapter reference included), eager
generation, a bad option named, FSDP1 refused, and one 2-process group (gloo) that runs a DDP and
an FSDP2 fit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_LLAMA, make_pointwise_batch
from torch._dynamo.utils import counters

from ulma_lightning import PolicyConfig
from ulma_lightning.cli import main
from ulma_lightning.compiling import check_strategy, compile_options, is_compiled
from ulma_lightning.losses import ulma_loss
from ulma_lightning.policy import Policy

AOT = {"backend": "aot_eager", "dynamic": True}  # fit: varying lengths, compiled dynamic at once
AOT_STATIC = {"backend": "aot_eager", "dynamic": False}  # one shape
TINY_CLI = json.dumps({**TINY_LLAMA, "num_hidden_layers": 1, "tie_word_embeddings": True})


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])
    torch._dynamo.reset()
    counters.clear()


def _policy(compile: object = False, **options: object) -> Policy:
    torch.manual_seed(0)  # the LoRA adapters' init
    policy = Policy(PolicyConfig(model_config={**TINY_LLAMA, "num_hidden_layers": 1}, compile=compile, **options))  # type: ignore[arg-type]
    policy.build()
    return policy


def _loss_and_grads(
    policy: Policy, batch: dict, reference: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy.model.zero_grad()
    out = ulma_loss(policy.logps(batch, average=True), reference, batch["score"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}


def _assert_same(eager: Policy, compiled: Policy, batch: dict, *, atol: float) -> None:
    reference = eager.reference_logps(batch, average=True)
    loss_e, grads_e = _loss_and_grads(eager, batch, reference)
    loss_c, grads_c = _loss_and_grads(compiled, batch, reference)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path ran
    torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=1e-5)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, atol=atol, rtol=1e-4, msg=name)


def test_inductor_loss_and_gradients_equal_eager(demo_tokenizer) -> None:
    batch = make_pointwise_batch(demo_tokenizer, [1.0, 0.0, 1.0, 0.0])
    eager, compiled = _policy(), _policy({"dynamic": False}, reference="none")
    assert is_compiled(compiled.model) and not is_compiled(eager.model)
    _assert_same(eager, compiled, batch, atol=1e-5)


def test_lora_with_adapter_reference_equals_eager(demo_tokenizer) -> None:
    lora = {"r": 4, "dropout": 0.0}
    from ulma_lightning.policy import LoraSettings

    eager = _policy(lora=LoraSettings(**lora), reference="adapter")
    compiled = _policy(AOT_STATIC, lora=LoraSettings(**lora), reference="adapter")
    assert is_compiled(compiled.model)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    batch = make_pointwise_batch(demo_tokenizer, [0.0, 0.0, 1.0])
    _assert_same(eager, compiled, batch, atol=1e-6)
    torch.testing.assert_close(
        compiled.reference_logps(batch, average=True), eager.reference_logps(batch, average=True)
    )


def test_new_lengths_do_not_recompile_and_generation_runs_eager(demo_tokenizer) -> None:
    from ulma_lightning.evaluation.generation import GenerationConfig, generate_ids

    eager, compiled = _policy(), _policy({"backend": "aot_eager"})  # dynamic unset: torch's default
    for size in (2, 3, 4, 5, 6):  # a new padded length and batch size each time
        batch = make_pointwise_batch(demo_tokenizer, [1.0, 0.0] * 3, pairs=None)
        batch = {k: v[:size] for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(compiled.logps(batch, average=True), eager.logps(batch, average=True))
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2  # static, then once dynamic; not one per length
    prompts = demo_tokenizer(["\n\nHuman: hi\n\nAssistant: "] * 2, return_tensors="pt")
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    ids = [
        generate_ids(p.model, demo_tokenizer, prompts["input_ids"], prompts["attention_mask"], config)
        for p in (eager, compiled)
    ]
    assert torch.equal(ids[0], ids[1])
    assert counters["stats"]["unique_graphs"] == graphs  # generation compiled nothing


def test_bad_compile_options_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"policy.compile: unknown key 'mod'.*allowed keys: backend, dynamic, fullgraph, mode"
    ):
        PolicyConfig(model_config=TINY_LLAMA, compile={"mod": "default"})
    with pytest.raises(ValueError, match=r"policy.compile.dynamic must be null .*got 'yes'"):
        PolicyConfig(model_config=TINY_LLAMA, compile={"dynamic": "yes"})
    with pytest.raises(ValueError, match=r"policy.compile.mode must be"):
        compile_options({"mode": "fastest"})
    with pytest.raises(ValueError, match="policy.compile must be true, false or a mapping"):
        compile_options("inductor")
    assert compile_options(False) is None and compile_options(True) == {}


def test_fsdp1_is_refused_naming_the_option_and_strategy() -> None:
    from ulma_lightning.sharding import AutoWrapFSDPStrategy, FSDP2Strategy

    with pytest.raises(ValueError, match=r"policy.compile is not supported with AutoWrapFSDPStrategy .*fsdp.yaml"):
        check_strategy(AutoWrapFSDPStrategy())
    check_strategy(FSDP2Strategy())  # FSDP2 works (the group test runs it)


def _fit(root: Path, *extra: str):
    return main([
        "fit", "--config", str(REPO / "configs" / "ulma.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
        "--data.init_args.train", "demo://binary?n=48", "--data.init_args.batch_size", "6",
        "--model.init_args.policy.model_config", TINY_CLI,
        *extra,
    ])  # fmt: skip


@pytest.mark.integration
def test_fit_resume_and_export_with_compile_keep_eager_keys(tmp_path: Path) -> None:
    from ulma_lightning.export_cli import main as export

    _fit(tmp_path / "eager", "--trainer.max_steps", "2")
    compiled = _fit(
        tmp_path / "compiled", "--trainer.max_steps", "2", "--model.init_args.policy.compile", json.dumps(AOT)
    )
    assert is_compiled(compiled.model.policy.model) and is_compiled(compiled.model.policy.reference_model)
    assert counters["stats"]["unique_graphs"] >= 1
    ckpts = [
        root / "ulma" / "version_0" / "checkpoints" / "last.ckpt"
        for root in (tmp_path / "eager", tmp_path / "compiled")
    ]
    states = [torch.load(c, map_location="cpu", weights_only=False)["state_dict"] for c in ckpts]
    assert states[1].keys() == states[0].keys() and not any("_orig_mod" in k for k in states[1])
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, atol=1e-5, rtol=1e-4, msg=name)
    resumed = _fit(
        tmp_path / "compiled",
        "--trainer.max_steps",
        "3",
        "--ckpt_path",
        "last",
        "--model.init_args.policy.compile",
        json.dumps(AOT),
    )
    assert resumed.trainer.global_step == 3
    assert counters["stats"]["unique_graphs"] < 8  # a few variants (train, eval, reference), not one per batch
    out = export(["--ckpt", str(ckpts[1]), "--out", str(tmp_path / "hf")])
    saved = json.loads((Path(out) / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and not any("_orig_mod" in p.name for p in Path(out).iterdir())


# ----------------------------------------------------------------------------- DDP and FSDP2, 2 processes
def _run_group(folder: Path, runs: list[dict]) -> None:
    (folder / "runs.json").write_text(json.dumps(runs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    drop = ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    base.update(PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs, logs = [], [folder / f"rank{r}.log" for r in (0, 1)]
    for rank, log in enumerate(logs):
        env = {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        with open(log, "w") as handle:
            cmd = [sys.executable, str(REPO / "tests" / "dist_runner.py"), str(folder / "runs.json")]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, cwd=folder, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.name} exited {proc.returncode}:\n{log.read_text()[-4000:]}"


@pytest.mark.integration
def test_ddp_and_fsdp2_fit_with_compile(tmp_path: Path) -> None:
    def argv(strategy: str) -> list[str]:
        return [
            "fit", "--config", str(REPO / "configs" / "ulma.yaml"),
            "--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--data.init_args.batch_size", "4", "--data.init_args.train", "demo://binary?n=32",
            "--model.init_args.policy.model_config", TINY_CLI, "--model.init_args.policy.compile", json.dumps(AOT),
        ]  # fmt: skip

    _run_group(tmp_path, [{"name": s, "argv": argv(s)} for s in ("ddp", "fsdp2")])
    for strategy in ("ddp", "fsdp2"):
        results = [json.loads((tmp_path / strategy / f"result.rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["global_step"] for r in results] == [2, 2], strategy
        assert all(r["compiled_graphs"] >= 1 for r in results), strategy  # the blocks ran compiled
        assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-6), strategy  # ranks agree
        assert results[0]["metrics"]["train/loss"] is not None, strategy
