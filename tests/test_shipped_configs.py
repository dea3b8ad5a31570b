"""The configs ship in the wheel (issue 27, item 13): a built and installed wheel holds every file of
``configs/``; ``ulma configs`` lists them, ``ulma configs cp NAME DEST`` copies one, ``--config NAME``
reads the shipped one where no such file is, and ``ulma compare`` falls back to them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from ulma_lightning.shipped import resolve_config_names, shipped_configs

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

REPO_CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
ULMA = "import sys; from ulma_lightning.cli import run; sys.argv[0] = 'ulma'; run()"


def ulma(args: list[str], cwd: Path, pythonpath: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", ULMA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_pyproject_lists_every_package_and_maps_configs() -> None:
    from setuptools import find_packages

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    config_dirs = sorted({str(Path(name).parent) for name in REPO_CONFIGS})
    config_packages = ["ulma_lightning.configs" + ("" if d == "." else "." + d.replace("/", ".")) for d in config_dirs]
    assert sorted(tool["packages"]) == sorted(find_packages(str(REPO), include=["ulma_lightning*"]) + config_packages)
    assert tool["package-dir"] == {"ulma_lightning.configs": "configs"}
    assert all(tool["package-data"][package] == ["*.yaml"] for package in config_packages)


def test_the_wheel_ships_the_configs_and_ulma_finds_them_there(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("configs", "ulma_lightning"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    inside = target / "ulma_lightning" / "configs"
    assert sorted(p.relative_to(inside).as_posix() for p in inside.rglob("*.yaml")) == REPO_CONFIGS
    assert (inside / "ulma.yaml").read_text() == (REPO / "configs" / "ulma.yaml").read_text()

    work = tmp_path / "work"  # a user's folder: no configs/ in it
    work.mkdir()
    listed = ulma(["configs"], work, target)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert str(inside) in listed.stdout
    assert {"ulma", "dpo", "strategy/fsdp2", "task/gpu/hh_golden"} <= {
        line.strip() for line in listed.stdout.splitlines()
    }
    printed = ulma(["fit", "--config", "ulma", "--print_config"], work, target)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert yaml.safe_load(printed.stdout)["model"]["class_path"] == "ulma_lightning.ULMAModule"
    spec = subprocess.run(
        [sys.executable, "-c",
         "import ulma_lightning, ulma_lightning.compare.spec as s; print(ulma_lightning.__file__); "
         "print(s.PACKAGE_CONFIGS)"],
        cwd=work, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert spec.stdout.split() == [str(target / "ulma_lightning" / "__init__.py"), str(inside)], spec.stderr[-2000:]


def test_configs_lists_and_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from ulma_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["configs"]) == 0
    names = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert names == sorted(shipped_configs()) and len(names) == len(REPO_CONFIGS)

    assert main(["configs", "cp", "ulma", "my_ulma.yaml"]) == 0
    assert (tmp_path / "my_ulma.yaml").read_text() == (REPO / "configs" / "ulma.yaml").read_text()
    (tmp_path / "mine").mkdir()
    assert main(["configs", "cp", "strategy/fsdp2", "mine"]) == 0
    assert (tmp_path / "mine" / "fsdp2.yaml").read_text() == (REPO / "configs" / "strategy" / "fsdp2.yaml").read_text()
    capsys.readouterr()

    with pytest.raises(SystemExit) as again:
        main(["configs", "cp", "ulma", "my_ulma.yaml"])
    assert again.value.code == 2 and "exists; pass --force" in capsys.readouterr().err
    assert main(["configs", "cp", "dpo", "my_ulma.yaml", "--force"]) == 0
    assert (tmp_path / "my_ulma.yaml").read_text() == (REPO / "configs" / "dpo.yaml").read_text()
    with pytest.raises(SystemExit) as unknown:
        main(["configs", "cp", "ulmaa", "x.yaml"])
    err = capsys.readouterr().err
    assert unknown.value.code == 2 and "no shipped config 'ulmaa'" in err and "ulma_continuous" in err


def test_config_name_resolves_to_a_shipped_config_only_where_no_such_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = str(shipped_configs()["ulma"])
    assert resolve_config_names(["fit", "--config", "ulma", "-c", "task/ulma", "--config=dpo"]) == [
        "fit", "--config", shipped, "-c", str(shipped_configs()["task/ulma"]), f"--config={shipped_configs()['dpo']}",
    ]  # fmt: skip
    assert resolve_config_names(
        ["fit", "--config", "ulma.yaml", "--config", "nope", "--trainer.max_steps", "ulma"]
    ) == [
        "fit",
        "--config",
        "ulma.yaml",
        "--config",
        "nope",
        "--trainer.max_steps",
        "ulma",
    ]  # fmt: skip  (a path with an extension, an unknown name and other options' values are left alone)
    (tmp_path / "ulma").write_text("trainer: {max_epochs: 1}\n")
    assert resolve_config_names(["--config", "ulma"]) == ["--config", "ulma"]  # a file here wins


@pytest.mark.integration
def test_fit_with_a_shipped_name_trains(tmp_path: Path) -> None:
    """``ulma fit --config ulma`` from a folder without configs/ (one step)."""
    done = ulma(
        [
            "fit",
            "--config",
            "ulma",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs" / "ulma" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "ulma_lightning.ULMAModule"
    assert (tmp_path / "runs" / "ulma" / "version_0" / "hf_model" / "config.json").exists()


def test_compare_falls_back_to_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid in a folder without configs/ (an installed user's): its methods are the shipped configs."""
    from helpers import GRID, write_grid

    from ulma_lightning.compare.spec import PACKAGE_CONFIGS, load_grid
    from ulma_lightning.shipped import shipped_configs_dir

    monkeypatch.chdir(tmp_path)
    grid = load_grid(write_grid(tmp_path, GRID))
    assert PACKAGE_CONFIGS == shipped_configs_dir()
    assert {stage.config for run in grid.runs for stage in run.stages} == {
        shipped_configs()[name] for name in ("sft", "dpo", "ulma")
    }
