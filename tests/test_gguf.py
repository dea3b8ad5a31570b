"""GGUF checkpoints as a model source (issue 24, item 1 and its bad inputs).

A tiny llama GGUF is written here with the ``gguf`` package's writer (quantised weights, a real BPE
tokenizer and a chat template in its metadata): ``policy.model`` loads it dequantised; ``ulma fit``
trains it, resumes from its checkpoint, and exports an ordinary Hugging Face folder that loads with
``gguf`` unavailable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from gguf_helpers import CHAT_TEMPLATE, write_tiny_gguf

from ulma_lightning import _compat
from ulma_lightning.cli import main
from ulma_lightning.gguf_models import GGUF_EXTRA, load_gguf_model
from ulma_lightning.modules.reward import RewardModel
from ulma_lightning.policy import Policy, PolicyConfig
from ulma_lightning.tokenizers import build_demo_tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf"
    return path, write_tiny_gguf(path, quant="Q4_1")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ulma"])


def test_a_gguf_policy_loads_as_a_float_model_with_the_files_tokenizer(tiny_gguf) -> None:
    path, expected = tiny_gguf
    policy = Policy(PolicyConfig(model=str(path)))
    policy.build()
    state = policy.model.state_dict()
    for name, value in expected.items():  # the dequantised Q4_1 weights, q/k rows back in transformers' order
        assert torch.equal(state[name], value), name
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    assert getattr(policy.model, "hf_quantizer", None) is None  # nothing marks it quantised: save_pretrained works
    assert getattr(policy.model.config, "quantization_config", None) is None
    demo = build_demo_tokenizer()
    text = "\n\nHuman: plant a tree\n\nAssistant: dig a hole"
    assert policy.tokenizer(text)["input_ids"] == demo(text)["input_ids"]
    assert policy.tokenizer.chat_template == CHAT_TEMPLATE
    assert (
        policy.model.training and not policy.reference_model.training
    )  # from_pretrained's eval mode is undone for the policy
    reference = policy.reference_model.state_dict()  # the reference copies the dequantised weights
    assert all(torch.equal(reference[k], v) for k, v in expected.items())
    # a folder plus gguf_file is the same source
    same = Policy(PolicyConfig(model=str(path.parent), gguf_file=path.name, reference="none"))
    same.build()
    assert all(torch.equal(same.model.state_dict()[k], v) for k, v in expected.items())
    assert same.tokenizer.chat_template == CHAT_TEMPLATE


def test_a_reward_model_loads_its_backbone_from_a_gguf(tiny_gguf) -> None:
    path, expected = tiny_gguf
    reward = RewardModel(PolicyConfig(model=str(path), reference="none"))
    reward.build()
    state = reward.model.state_dict()
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"])
    assert reward.model.score.weight.shape == (1, 64)
    scores = reward.rewards(reward.tokenizer(["a tree", "a hole"], return_tensors="pt", padding=True))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_quantiser_marker_is_dropped_where_transformers_keeps_it(
    tiny_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the dequantise option (older transformers have none), transformers 5 attaches a GGUF
    quantiser that makes save_pretrained refuse; the loaded model is rebuilt as a plain one."""
    from transformers import AutoModelForCausalLM

    path, expected = tiny_gguf
    marked = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(marked, "hf_quantizer", None) is not None:  # transformers 5: the refusal the rebuild avoids
        with pytest.raises(ValueError, match="not serializable"):
            marked.save_pretrained(tmp_path / "refused")
    monkeypatch.setattr(_compat, "gguf_dequantize_options", dict)
    model = load_gguf_model(AutoModelForCausalLM, str(path))
    assert getattr(model, "hf_quantizer", None) is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def fit(gguf: Path, root: Path, *extra: str):
    """``ulma fit --config configs/ulma.yaml`` from the GGUF, a few steps on the demo task."""
    return main([
        "fit", "--config", str(REPO / "configs" / "ulma.yaml"), "--model.init_args.policy.model", str(gguf),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
        "--data.init_args.train", "demo://binary?n=24", "--data.init_args.batch_size", "4",
        "--data.init_args.max_length", "64",
        *extra,
    ])  # fmt: skip


LOAD_WITHOUT_GGUF = """
import json, sys
sys.modules["gguf"] = None  # `import gguf` raises ImportError from here on
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer("dig a hole", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0, -1, :5].tolist()
print(json.dumps({
    "template": tokenizer.chat_template,
    "ids": ids[0].tolist(),
    "logits": logits,
    "gguf": "gguf" in sys.modules and sys.modules["gguf"] is not None,
}))
"""


def load_without_gguf(folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_GGUF, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_fit_from_a_gguf_resumes_and_exports_a_folder_that_loads_without_gguf(tiny_gguf, tmp_path: Path) -> None:
    path, expected = tiny_gguf
    cli = fit(path, tmp_path, "--trainer.max_steps", "2")
    trained = cli.model.policy.model
    assert not torch.equal(
        trained.state_dict()["model.layers.0.mlp.up_proj.weight"], expected["model.layers.0.mlp.up_proj.weight"]
    )  # it trained
    run = tmp_path / "ulma" / "version_0"
    exported = run / "hf_model"  # HFExport at the end of fit
    assert (exported / "model.safetensors").is_file()
    assert not list(exported.glob("*.gguf"))
    loaded = load_without_gguf(exported)
    assert loaded["gguf"] is False
    assert loaded["template"] == CHAT_TEMPLATE
    assert loaded["ids"] == build_demo_tokenizer()("dig a hole")["input_ids"]
    ids = torch.tensor([loaded["ids"]])
    with torch.no_grad():
        want = trained.eval()(ids).logits[0, -1, :5]
    assert torch.allclose(torch.tensor(loaded["logits"]), want, atol=1e-5)

    # `ulma export` of the checkpoint writes the same ordinary folder
    out = tmp_path / "export"
    main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)])
    again = load_without_gguf(out)
    assert again["template"] == CHAT_TEMPLATE and again["logits"] == pytest.approx(loaded["logits"], abs=1e-5)

    # resume from the checkpoint: the run continues at step 2 from the trained weights
    resumed = fit(path, tmp_path, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 3
    assert not torch.equal(
        resumed.model.policy.model.state_dict()["model.layers.0.mlp.up_proj.weight"],
        trained.state_dict()["model.layers.0.mlp.up_proj.weight"],
    )


# ---------------------------------------------------------------- bad input


def test_a_gguf_without_the_gguf_package_names_the_extra(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError) as err:
        Policy(PolicyConfig(model=str(path)))
    assert GGUF_EXTRA in str(err.value) and str(path) in str(err.value)


def test_an_unsupported_architecture_names_it_and_the_quantisation(tmp_path: Path) -> None:
    path = tmp_path / "rwkv.gguf"
    write_tiny_gguf(path, architecture="rwkv6", quant="Q8_0")
    with pytest.raises(ValueError) as err:
        Policy(PolicyConfig(model=str(path)))
    message = str(err.value)
    assert "'rwkv6'" in message and "Q8_0" in message and str(path) in message


def test_an_unsupported_quantisation_names_it_and_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "q8_1.gguf"
    write_tiny_gguf(path, quant="Q8_1")
    with pytest.raises(ValueError) as err:
        Policy(PolicyConfig(model=str(path)))
    message = str(err.value)
    assert "Q8_1" in message and "'llama'" in message and "tensor type(s) Q8_1" in message


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_a_truncated_gguf_names_the_file(tiny_gguf, tmp_path: Path, keep: float) -> None:
    path, _ = tiny_gguf
    data = path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated") as err:
        Policy(PolicyConfig(model=str(short)))
    assert str(short) in str(err.value)


def test_a_missing_gguf_file_and_a_misused_gguf_file_option_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Policy(PolicyConfig(model=str(tmp_path / "nope.gguf")))
    with pytest.raises(ValueError, match="gguf_file"):
        PolicyConfig(model_config={"model_type": "llama"}, gguf_file="x.gguf")
    with pytest.raises(ValueError, match="gguf_file"):
        PolicyConfig(model=str(tmp_path), gguf_file="weights.bin")


@pytest.mark.integration
def test_a_folder_plus_gguf_file_on_the_command_line_gives_the_data_the_files_tokenizer(
    tiny_gguf, tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    cli = fit(
        path,
        tmp_path,
        "--model.init_args.policy.model",
        str(path.parent),
        "--model.init_args.policy.gguf_file",
        path.name,
        "--trainer.max_steps",
        "1",
    )
    assert cli.model.policy.config.model_source == f"{path.parent}/{path.name}"
    assert (
        cli.datamodule.tokenizer_source == f"{path.parent}/{path.name}"
    )  # linked: the data tokenizes with the GGUF's tokenizer
    assert cli.datamodule.tokenizer.chat_template == CHAT_TEMPLATE
