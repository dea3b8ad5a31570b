"""Strategy configs (configs/strategy/*.yaml) and the block classes they shard, checked on CPU."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch import Trainer
from torch import nn

from ulma_lightning.cli import main
from ulma_lightning.lightning_cli import read_config
from ulma_lightning.sharding import AutoWrapFSDPStrategy, FSDP2Strategy, decoder_layer_classes


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process CLI runs take their arguments from ``main(args)``, not pytest's command line."""
    monkeypatch.setattr(sys, "argv", ["ulma"])


FAMILIES = {
    "llama": ("LlamaDecoderLayer", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2DecoderLayer", {"num_key_value_heads": 2}),
    "mistral": ("MistralDecoderLayer", {"num_key_value_heads": 2}),
    "gemma": ("GemmaDecoderLayer", {"num_key_value_heads": 2, "head_dim": 8}),
    "gpt2": ("GPT2Block", {}),
}


def _tiny(model_type: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = FAMILIES[model_type][1]
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64)
    else:
        config = AutoConfig.for_model(
            model_type,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=64,
            **extra,
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_decoder_block_is_found_for_each_family(model_type: str) -> None:
    model = _tiny(model_type)
    (block,) = decoder_layer_classes(model)
    assert block.__name__ == FAMILIES[model_type][0]
    container = nn.ModuleDict({"policy": model})  # e.g. a LightningModule holding the model
    assert decoder_layer_classes(container) == (block,)


def test_block_classes_can_be_overridden_and_a_wrong_name_is_explained() -> None:
    model = _tiny("llama")
    (mlp,) = decoder_layer_classes(model, ["LlamaMLP"])
    assert mlp.__name__ == "LlamaMLP"
    with pytest.raises(ValueError, match="layer_classes"):
        decoder_layer_classes(model, ["Qwen2DecoderLayer"])


def _printed_config(*configs: str) -> dict[str, Any]:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO / config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.integration
def test_fsdp_config_parses_and_its_strategy_wraps_decoder_blocks_on_cpu() -> None:
    """torch FSDP needs a GPU: on CPU we check the config as far as building its strategy."""
    config = _printed_config("configs/ulma.yaml", "configs/strategy/fsdp.yaml")
    trainer = config["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    strategy_cfg = trainer["strategy"]
    assert strategy_cfg["class_path"] == "ulma_lightning.sharding.AutoWrapFSDPStrategy"
    assert strategy_cfg["init_args"]["state_dict_type"] == "sharded"
    assert config["model"]["class_path"] == "ulma_lightning.ULMAModule"  # the method config is intact

    strategy = AutoWrapFSDPStrategy(**strategy_cfg["init_args"])
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.wrap_policy(nn.ModuleDict({"policy": _tiny("qwen2"), "reference": _tiny("qwen2")}))
    assert {c.__name__ for c in policy._module_classes} == {"Qwen2DecoderLayer"}
    cpu = Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="CUDA GPUs only.*fsdp2.yaml"):
        cpu.strategy.setup_environment()


@pytest.mark.parametrize(
    ("config", "class_path"),
    [
        ("configs/strategy/ddp.yaml", "lightning.pytorch.strategies.DDPStrategy"),
        ("configs/strategy/fsdp2.yaml", "ulma_lightning.sharding.FSDP2Strategy"),
    ],
)
def test_strategy_configs_compose_with_the_method_config(config: str, class_path: str) -> None:
    parsed = _printed_config("configs/ulma.yaml", config)
    assert parsed["trainer"]["strategy"]["class_path"] == class_path
    assert parsed["trainer"]["devices"] == "auto"
    assert parsed["model"]["init_args"]["beta"] == 0.1  # from configs/ulma.yaml
    callbacks = [c["class_path"] for c in parsed["trainer"]["callbacks"]]
    assert "ulma_lightning.checkpointing.AtomicModelCheckpoint" in callbacks


@pytest.mark.integration
def test_fsdp2_strategy_follows_the_trainer_precision() -> None:
    bf16 = Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", strategy=FSDP2Strategy(), logger=False)
    assert bf16.strategy.shard_options()["param_dtype"] == torch.bfloat16
    fp32 = Trainer(
        accelerator="cpu", devices=1, precision="32-true", strategy=FSDP2Strategy(layer_classes=["X"]), logger=False
    )
    options = fp32.strategy.shard_options()
    assert options["param_dtype"] is None and options["reduce_dtype"] == torch.float32
    assert options["layer_classes"] == ["X"]


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_configs_checkpoint_atomically(config) -> None:
    callbacks = read_config(config).get("trainer", {}).get("callbacks", [])
    checkpoints = [c["class_path"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints == ["ulma_lightning.checkpointing.AtomicModelCheckpoint"], config.name
