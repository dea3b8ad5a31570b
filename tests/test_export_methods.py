"""``ulma export`` on a checkpoint of every method, each trained one step from its shipped config.

The causal-LM methods export a folder that ``AutoModelForCausalLM`` loads with the trained policy's
logits; the reward model exports a sequence classifier that ``AutoModelForSequenceClassification``
loads with the module's scores.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, make_pointwise_batch
from helpers import METHODS, fit_one_step
from rl_helpers import LengthScorer, policy

from ulma_lightning import GRPOModule, OnlineULMAModule, RLOOModule
from ulma_lightning.cli import main


@pytest.mark.integration
@pytest.mark.parametrize("config", list(METHODS))
def test_export_of_every_method_loads_with_the_trained_outputs(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_tokenizer
) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    monkeypatch.setattr(sys, "argv", ["ulma"])
    module = fit_one_step(config, tmp_path).model
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])

    batch = make_pointwise_batch(demo_tokenizer, [1.0, 0.0, 1.0])  # rows of different lengths, right-padded
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.eval()
    with torch.no_grad():
        if config == "reward":
            loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
            assert loaded.config.num_labels == 1
            expected, exported = module.rewards(inputs), loaded(**inputs).logits.squeeze(-1)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
            expected, exported = module.policy.model(**inputs).logits, loaded(**inputs).logits
    assert expected.std() > 0
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-6)


#: a rollout module built in Python, and the parent arguments its constructor fills from its own options
REBUILT = {
    "online_ulma": (
        lambda: OnlineULMAModule(policy(), scorer=LengthScorer(), beta=0.3, samples_per_prompt=2),
        {"kl_coef"},
    ),
    "rloo": (lambda: RLOOModule(policy(), scorer=LengthScorer(), rloo_k=3), {"samples_per_prompt"}),
    "grpo": (
        lambda: GRPOModule(policy(), scorer=LengthScorer(), num_generations=3, beta=0.1),
        {"samples_per_prompt", "kl_coef", "kl_estimator"},
    ),
}


@pytest.mark.parametrize("method", list(REBUILT))
def test_a_module_built_in_python_rebuilds_from_its_hparams(method: str) -> None:
    """``ulma export`` and ``load_from_checkpoint`` rebuild a module as ``cls(**hparams)``: a value a
    subclass passes to its parent under the parent's name (online ULMA's beta as kl_coef) must not be
    among them, or the subclass refuses it ("takes beta, not kl_coef")."""
    build, parent_only = REBUILT[method]
    module = build()
    assert not parent_only & set(module.hparams), sorted(module.hparams)
    rebuilt = type(module)(**module.hparams)
    assert (
        float(rebuilt.kl_coef) == float(module.kl_coef) and rebuilt.samples_per_prompt == module.samples_per_prompt > 1
    )


# ----------------------------------------------------------------------------- refusals and failures
@pytest.mark.integration
@pytest.mark.usefixtures("plain_argv")
def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path, dpo_checkpoint: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own config")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"--out .*mine is a folder that is not empty.*--overwrite"):
        main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(out)])
    assert (out / "config.json").read_text() == "my own config"
    main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(out), "--overwrite"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not (out / "notes.txt").exists()  # replaced whole, not mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder left


@pytest.mark.integration
@pytest.mark.usefixtures("plain_argv")
def test_a_failed_export_leaves_no_partial_folder_and_names_the_path(
    tmp_path: Path, dpo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ulma_lightning.modules.base import AlignmentModule

    def disk_full(self, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AlignmentModule, "export_hf", disk_full)
    with pytest.raises(OSError, match=r"no space left on the device to export to .*hf_out"):
        main(["export", "--ckpt", str(dpo_checkpoint), "--out", str(tmp_path / "hf_out")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_failed_export_at_the_end_of_fit_leaves_no_folder_that_looks_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26, item 2: on a full disk, ``hf_model/`` was left with its config and weights and a
    truncated ``tokenizer.json`` (it looked valid; AutoTokenizer failed on it), by an error naming no
    folder. Now the export is written beside it and moved into place, and the error names it."""
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "argv", ["ulma"])
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(
        OSError,
        match=r"HFExport \(trainer\.callbacks\): writing the Hugging Face folder "
        r".*/sft/version_0/hf_model failed .*Free space",
    ) as info:
        fit_one_step("sft", tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in tmp_path.rglob("*hf_model*")]  # neither the folder nor its partial
    assert list(tmp_path.rglob("last.ckpt"))  # the checkpoint is there to export from


def test_an_adapter_written_atomically_points_at_its_base_in_the_final_folder(tmp_path: Path) -> None:
    """HFExport writes under a partial folder now: the adapter's base_model path must name the folder it ends in."""
    from ulma_lightning.export import export_atomically, export_hf
    from ulma_lightning.policy import LoraSettings, Policy, PolicyConfig

    policy = Policy(PolicyConfig(model_config=TINY_LLAMA, lora=LoraSettings(r=4), reference="none"))
    policy.build()
    out = tmp_path / "hf_model"
    export_atomically(lambda partial: export_hf(policy.model, policy.tokenizer, partial, merge_lora=False), out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())
    assert (out / "base_model" / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]
