"""The shipped configs and their shared defaults (``ulma_lightning/defaults.yaml``, read by every
``ulma fit|validate|test|predict`` before any ``--config``): each config resolves to the defaults it does
not change and to every value it states, and an edit of the one defaults file reaches every config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from ulma_lightning import lightning_cli
from ulma_lightning.cli import main

pytestmark = pytest.mark.usefixtures("plain_argv")

CONFIGS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("configs/*.yaml"), *REPO.glob("configs/task/*.yaml")])
DEFAULTS = yaml.safe_load(lightning_cli.DEFAULTS_FILE.read_text())


def resolved(capsys: pytest.CaptureFixture, *configs: str) -> dict[str, Any]:
    """The config ``ulma fit --config C1 --config C2 ... --print_config`` prints, as a dict."""
    args = ["fit"] + [arg for config in configs for arg in ("--config", str(REPO / config))]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def assert_contains(actual: Any, expected: Any, where: str) -> None:
    """Every key and value of ``expected`` is in ``actual`` (lists item by item, of the same length)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a mapping"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            assert_contains(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_contains(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def unset_defaults(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The part of ``defaults`` that a config's own values do not set (a list it gives replaces the default)."""
    out = {}
    for key, value in defaults.items():
        if key not in own:
            out[key] = value
        elif isinstance(value, dict) and isinstance(own[key], dict):
            out[key] = unset_defaults(value, own[key])
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_a_shipped_config_resolves_to_the_shared_defaults_and_to_its_own_values(
    config: str, capsys: pytest.CaptureFixture
) -> None:
    own = yaml.safe_load((REPO / config).read_text())
    appended = own.get("trainer", {}).pop("callbacks+", None)
    got = resolved(capsys, config)
    assert_contains(got, own, config)
    defaults = unset_defaults(DEFAULTS, own)
    if appended is not None:
        defaults["trainer"].pop("callbacks")
    assert_contains(got, defaults, f"{config} (defaults)")
    if appended is not None:  # callbacks+: the default list, then the config's own
        assert_contains(got["trainer"]["callbacks"], DEFAULTS["trainer"]["callbacks"] + appended, f"{config} callbacks")
    assert got["model"]["init_args"]["policy"]["model_config"]["hidden_size"] == 96  # the tiny model, from the defaults


def test_one_edit_of_the_defaults_file_changes_every_config(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = yaml.safe_load(lightning_cli.DEFAULTS_FILE.read_text())
    edited["trainer"]["precision"] = "bf16-mixed"
    edited["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = 3
    edited["model"]["init_args"]["policy"]["model_config"]["hidden_size"] = 48
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(edited))
    monkeypatch.setitem(
        lightning_cli.CLI_DEFAULTS,
        "parser_kwargs",
        {command: {"default_config_files": [str(path)]} for command in ("fit", "validate", "test", "predict")},
    )
    for config in ("configs/sft.yaml", "configs/ulma.yaml", "configs/dpo.yaml"):
        got = resolved(capsys, config)
        assert got["trainer"]["precision"] == "bf16-mixed", config
        assert got["trainer"]["callbacks"][0]["init_args"]["save_top_k"] == 3, config
        assert got["model"]["init_args"]["policy"]["model_config"]["hidden_size"] == 48, config


@pytest.mark.parametrize("config", CONFIGS)
def test_the_compare_runner_reads_a_config_over_the_shared_defaults(config: str) -> None:
    """``ulma compare`` reads stage configs itself (the logger decides where each run's TensorBoard
    folder goes): it must see the defaults' TensorBoardLogger in a config that no longer states it."""
    from ulma_lightning.compare.stages import _config, _is_tensorboard

    merged = _config(REPO / config)
    assert _is_tensorboard(merged, {})
    own = yaml.safe_load((REPO / config).read_text())["model"]
    assert merged["model"]["class_path"] == own["class_path"]
    policy = {**DEFAULTS["model"]["init_args"]["policy"], **own["init_args"].get("policy", {})}
    assert merged["model"]["init_args"]["policy"] == policy  # the defaults' tiny model unless the config gives one


def test_the_compare_runner_takes_a_configs_model_config_whole(tmp_path: Path) -> None:
    """A config's own ``model_config`` replaces the default tiny Llama whole, as ``ulma fit`` reads it."""
    from ulma_lightning.compare.stages import _config

    config = tmp_path / "gpt2.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "ulma_lightning.SFTModule",
                    "init_args": {"policy": {"model_config": {"model_type": "gpt2", "n_layer": 2}}},
                }
            }
        )
    )
    assert _config(config)["model"]["init_args"]["policy"]["model_config"] == {"model_type": "gpt2", "n_layer": 2}
