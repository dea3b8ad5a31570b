"""The repository passes its linter, formatter and type checker, as configured in pyproject.toml
(CONTRIBUTING.md lists the commands; ruff and mypy come with the ``test`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(tool: str, *args: str) -> None:
    """Run ``python -m tool args`` at the repository root; fail with its output unless it exits 0."""
    try:
        __import__(tool)
    except ImportError:
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]' (pyproject.toml pins it)")
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"`{tool} {' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


def test_ruff_check() -> None:
    run("ruff", "check", "--no-cache", ".")


def test_ruff_format() -> None:
    run("ruff", "format", "--check", "--no-cache", ".")


def test_mypy(tmp_path: Path) -> None:
    """mypy on the package (``[tool.mypy]``), from a fresh cache: about 20 s."""
    run("mypy", "--cache-dir", str(tmp_path / "mypy_cache"))
