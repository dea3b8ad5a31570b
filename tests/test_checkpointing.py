"""Checkpoints (ulma_lightning.checkpointing): atomic writes (a killed or failed save leaves the previous
one usable and no partial), ``--ckpt_path last`` (where it looks), and resuming from another method's
checkpoint (refused, saying what does not match)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import QUIET_FIT as QUIET
from conftest import REPO
from conftest import ULMA_CONFIG as ULMA

from ulma_lightning import checkpointing
from ulma_lightning.checkpointing import atomic_save, partial_path
from ulma_lightning.cli import main


def _write_folder(path: str, value: float, *, fail: bool = False) -> None:
    os.makedirs(path)
    torch.save({"w": torch.full((4,), value)}, os.path.join(path, "__0_0.distcp"))
    if fail:
        raise RuntimeError("disk full")
    torch.save({"step": value}, os.path.join(path, "meta.pt"))


def test_a_failed_file_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save(lambda p: torch.save({"step": 1}, p), target)

    def broken(path: str) -> None:
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("killed mid-write")

    with pytest.raises(OSError):
        atomic_save(broken, target)
    assert torch.load(target)["step"] == 1
    atomic_save(lambda p: torch.save({"step": 2}, p), target)  # the leftover partial is cleared
    assert torch.load(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_sharded_folders_are_swapped_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False)
    target = tmp_path / "last.ckpt"
    atomic_save(lambda p: _write_folder(p, 1.0), target)
    with pytest.raises(RuntimeError):
        atomic_save(lambda p: _write_folder(p, 2.0, fail=True), target)
    assert torch.load(target / "meta.pt")["step"] == 1.0
    assert torch.load(target / "__0_0.distcp")["w"][0] == 1.0
    atomic_save(lambda p: _write_folder(p, 3.0), target)
    assert torch.load(target / "meta.pt")["step"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A process killed (SIGKILL) halfway through writing the new checkpoint."""
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from ulma_lightning.checkpointing import atomic_save
        atomic_save(lambda p: torch.save({{"step": 1, "w": torch.ones(1000)}}, p), {str(target)!r})
        def dying(path):
            with open(path, "wb") as handle:
                handle.write(b"PK" * 1000)
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_save(dying, {str(target)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert partial_path(target).exists()  # the interrupted write
    state = torch.load(target)
    assert state["step"] == 1 and state["w"].sum() == 1000


@pytest.mark.integration
def test_last_is_found_in_earlier_runs_log_folders(tmp_path: Path) -> None:
    """Without `dirpath`, each run checkpoints into its own version folder: `--ckpt_path last`
    must still find the previous run's last checkpoint (the newest one)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from ulma_lightning.checkpointing import AtomicModelCheckpoint

    for version, name in ((0, "last.ckpt"), (1, "last-v1.ckpt"), (1, ".last.ckpt.partial"), (1, "epoch=0-step=4.ckpt")):
        folder = tmp_path / "ulma" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    callback = AtomicModelCheckpoint(save_last=True)
    trainer = Trainer(
        default_root_dir=tmp_path,
        logger=TensorBoardLogger(tmp_path, name="ulma"),
        callbacks=[callback],
        accelerator="cpu",
    )
    found = {Path(p).relative_to(tmp_path).as_posix() for p in callback._find_last_checkpoints(trainer)}
    assert found == {"ulma/version_0/checkpoints/last.ckpt", "ulma/version_1/checkpoints/last-v1.ckpt"}


def test_a_failed_checkpoint_save_removes_its_partial(tmp_path: Path) -> None:
    from ulma_lightning.checkpointing import atomic_save

    def disk_full(path: str) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_save(disk_full, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import TrainerFn

    from ulma_lightning.checkpointing import AtomicModelCheckpoint
    from ulma_lightning.loggers import TensorBoardLogger

    callback = AtomicModelCheckpoint(save_last=True)
    trainer = Trainer(logger=TensorBoardLogger(str(tmp_path), name="ulma"), callbacks=[callback], accelerator="cpu")
    with pytest.warns(
        UserWarning, match=rf"no last\*\.ckpt in {tmp_path}/ulma/\*/checkpoints, so this run starts from the initial"
    ):
        assert (
            trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn.FITTING, "last", model_provided=True, model_connected=True
            )
            is None
        )


# ----------------------------------------------------------------------------- 5: another method's checkpoint
@pytest.mark.integration
@pytest.mark.parametrize("how", ["path", "last"])
@pytest.mark.usefixtures("plain_argv")
def test_resuming_from_another_methods_checkpoint_says_what_does_not_match(
    tmp_path: Path, dpo_checkpoint: Path, how: str
) -> None:
    args = ["fit", "--config", ULMA, *QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    if how == "path":
        args += ["--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(dpo_checkpoint)]
    else:  # the DPO run's folder: runs/dpo/version_0/checkpoints/last.ckpt
        args += [
            "--trainer.default_root_dir",
            str(dpo_checkpoint.parents[3]),
            "--trainer.logger.init_args.name",
            "dpo",
            "--ckpt_path",
            "last",
        ]
    with pytest.raises(
        ValueError,
        match=r"written by another run's module DPOModule \(this run: ULMAModule\) "
        r"and data module PairwiseDataModule \(this run: PointwiseDataModule\)",
    ):
        main(args)


# -------------------------------------------------- issue 26, item 1: resume keeps the options or says which differ
@pytest.mark.integration
@pytest.mark.parametrize("how", ["path", "last"])
@pytest.mark.usefixtures("plain_argv")
def test_resuming_with_other_options_than_the_checkpoints_names_each_before_training(tmp_path: Path, how: str) -> None:
    """`--ckpt_path FILE` trained with the checkpoint's options and dropped the given ones without a
    word; `--ckpt_path last` kept the given ones and stopped on a size mismatch. Both now refuse."""
    from ulma_lightning.checkpointing import ResumeConflict

    base = [
        "fit",
        "--config",
        ULMA,
        *QUIET,
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    main([*base, "--trainer.max_steps", "1"])
    resume = [
        "--ckpt_path",
        str(tmp_path / "ulma" / "version_0" / "checkpoints" / "last.ckpt") if how == "path" else "last",
    ]
    changed = ["--model.init_args.beta", "0.5", "--model.init_args.policy.model_config.hidden_size", "128"]
    with pytest.raises(ResumeConflict) as info:
        main([*base, "--trainer.max_steps", "2", *changed, *resume])
    message = str(info.value)
    assert "2 option(s) differ from the ones the checkpoint was trained with" in message
    assert "model.init_args.beta: the checkpoint's 0.1, given 0.5" in message
    assert "model.init_args.policy.model_config.hidden_size: the checkpoint's 96, given 128" in message
    assert "drop these options" in message and "start a new run without --ckpt_path" in message
    assert (
        not list(tmp_path.rglob("epoch=*step=2*.ckpt"))
        and torch.load(tmp_path / "ulma" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        == 1
    )
    # the run's own options resume it; how the model runs (gradient checkpointing) may change
    cli = main([*base, "--trainer.max_steps", "2", "--model.init_args.policy.gradient_checkpointing", "true", *resume])
    assert (
        cli.trainer.global_step == 2
        and cli.model.hparams["beta"] == 0.1
        and cli.model.hparams["policy"]["gradient_checkpointing"] is True
    )


def test_resume_conflicts_compare_plain_values_and_skip_what_may_change() -> None:
    from ulma_lightning import PolicyConfig
    from ulma_lightning.checkpointing import resume_conflicts
    from ulma_lightning.evaluation import DemoScorer

    tiny = {"model_type": "llama", "hidden_size": 8}
    saved = {
        "_class_path": "a.B",
        "scorer": DemoScorer(),
        "policy": PolicyConfig(model_config=tiny),
        "beta": 0.1,
        "betas": (0.9, 0.99),
        "old_option": 1,
    }
    given = {
        "_class_path": "a.C",
        "scorer": DemoScorer(),
        "policy": PolicyConfig(model_config=tiny, compile=True, gradient_checkpointing=True),
        "beta": 0.1,
        "betas": [0.9, 0.99],
    }
    assert (
        resume_conflicts(saved, given) == []
    )  # instances by class, tuples as lists, how the model runs, an option of another version
    given["policy"] = PolicyConfig(model_config={**tiny, "hidden_size": 16}, dtype="bfloat16")
    assert resume_conflicts(saved, given) == [
        ("policy.dtype", "float32", "bfloat16"),
        ("policy.model_config.hidden_size", 8, 16),
    ]
