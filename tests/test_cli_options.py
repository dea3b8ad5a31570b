"""Options of the ``ulma`` commands: where a run writes (``trainer.default_root_dir``), a bad numeric
option named at the end of its message, ``ulma export``'s option spelling, and ``ulma fit --help``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QUIET_FIT as QUIET
from conftest import ULMA_CONFIG as ULMA

from ulma_lightning.cli import main

pytestmark = pytest.mark.usefixtures("plain_argv")


@pytest.mark.integration
def test_default_root_dir_decides_where_a_shipped_config_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", ULMA, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
          "--trainer.default_root_dir", "elsewhere/run1"])  # fmt: skip
    run = tmp_path / "elsewhere" / "run1" / "ulma" / "version_0"
    for written in ("checkpoints/last.ckpt", "hf_model/config.json", "config.yaml"):
        assert (run / written).exists(), written
    assert list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # nothing in ./runs


# ----------------------------------------------------------------------------- 10: numeric options
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--data.init_args.batch_size", "0", "PointwiseDataModule: batch_size must be >= 1, got 0"),
        ("--data.init_args.max_length", "-4", "PointwiseDataModule: max_length must be >= 1, got -4"),
        ("--model.init_args.beta", "0", "ULMAModule: beta must be > 0, got 0.0"),
        ("--model.init_args.optimizer.lr", "-1", "OptimizerConfig: lr must be >= 0, got -1.0"),
    ],
)
def test_a_bad_numeric_option_stops_with_its_name_at_the_end(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        main(["fit", "--config", ULMA, *QUIET, "--trainer.default_root_dir", str(tmp_path), option, value])
    assert str(info.value).startswith(message), str(info.value)
    assert "Namespace(" not in str(info.value)  # no dump of the config before (or instead of) the message


def test_export_options_use_underscores_and_accept_dashes() -> None:
    from ulma_lightning.export_cli import export_parser

    parser = export_parser()
    for flag in ("--keep_adapter", "--keep-adapter"):
        assert parser.parse_args(["--ckpt", "c", "--out", "o", flag]).keep_adapter
    assert "runs/ulma/version_0/checkpoints/last.ckpt" in parser.format_help().replace("\n", "").replace(" ", "")


def test_fit_help_says_how_to_see_model_and_data_options(capsys: pytest.CaptureFixture) -> None:
    from ulma_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--model.help ULMAModule" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- issue 26, item 13
def test_a_bad_option_of_a_class_used_twice_is_named_by_its_own_path(tmp_path: Path) -> None:
    """GenerationConfig is both PPO's `generation` and its `eval_generation`: the message named the first for the
    second."""
    ppo = str(Path(ULMA).with_name("ppo.yaml"))
    with pytest.raises(ValueError) as info:
        main(
            [
                "fit",
                "--config",
                ppo,
                "--trainer.default_root_dir",
                str(tmp_path),
                "--model.init_args.eval_generation.max_new_tokens",
                "0",
            ]
        )
    assert str(info.value).startswith(
        "GenerationConfig: model.init_args.eval_generation.max_new_tokens must be >= 1, got 0 (fix it"
    ), str(info.value)


def test_a_bad_numeric_option_names_its_path_in_the_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        main(
            [
                "fit",
                "--config",
                ULMA,
                *QUIET,
                "--trainer.default_root_dir",
                str(tmp_path),
                "--data.init_args.batch_size",
                "0",
            ]
        )
    assert (
        "batch_size must be >= 1, got 0 (option data.init_args.batch_size; fix it in the config or on the command line)"
        in str(info.value)
    )


@pytest.mark.integration
@pytest.mark.parametrize("off", ["--trainer.logger", "--trainer.enable_checkpointing"])
def test_one_callback_given_for_the_list_runs_with_logging_or_checkpointing_off(tmp_path: Path, off: str) -> None:
    """`--trainer.callbacks CLASS` makes the list one callback; with logging or checkpointing off, the
    check that drops their callbacks crashed on it (jsonargparse's `NSKeyError: Key must be a string, got: 0`)."""
    from ulma_lightning.callbacks import TokenThroughput

    cli = main(["fit", "--config", ULMA, *QUIET, "--trainer.default_root_dir", str(tmp_path),
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--trainer.callbacks", "ulma_lightning.callbacks.TokenThroughput", off, "false"])  # fmt: skip
    assert cli.trainer.global_step == 1
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, TokenThroughput)] == [TokenThroughput]
