"""The configs shipped with the package, by name: ``ulma configs`` lists them, ``ulma configs cp NAME
DEST`` copies one to edit, and ``--config NAME`` (no extension, no such file here) reads the shipped one.

The repository's ``configs/`` is the one copy: a wheel installs it as ``ulma_lightning/configs/``
(``pyproject.toml`` maps the package ``ulma_lightning.configs`` to that folder); a source checkout or an
editable install reads ``configs/`` beside the package.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def shipped_configs_dir() -> Path:
    """The folder of the shipped configs: inside the installed package, else the checkout's ``configs/``."""
    inside = _PACKAGE / "configs"
    return inside if inside.is_dir() else _PACKAGE.parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name: its path under :func:`shipped_configs_dir` without ``.yaml``
    (``ulma``, ``strategy/fsdp2``, ``task/gpu/hh_golden``), sorted."""
    root = shipped_configs_dir()
    if not root.is_dir():
        return {}
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob(f"*{SUFFIX}"))}


def shipped_config(name: str) -> Path | None:
    """The shipped config named ``name`` (``ulma`` or ``ulma.yaml``, ``task/ulma``), else None."""
    return shipped_configs().get(name.removesuffix(SUFFIX))


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config NAME`` (or ``-c NAME``, ``--config=NAME``) as the shipped config's path when ``NAME`` has
    no extension, names no file here and names a shipped config; everything else unchanged."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(_resolved(arg))
            expect_value = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + _resolved(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out


def _resolved(value: str) -> str:
    if Path(value).suffix or Path(value).exists():
        return value
    found = shipped_config(value)
    return str(found) if found is not None else value


def configs_main(argv: list[str] | None = None) -> int:
    """``ulma configs`` lists the shipped configs; ``ulma configs cp NAME DEST`` copies one."""
    parser = argparse.ArgumentParser(
        prog="ulma configs",
        description=(
            "List the configs shipped with ulma-lightning, or copy one to edit (`ulma configs cp ulma my.yaml`). "
            "A shipped name also works in place of a file: `ulma fit --config ulma`."
        ),
    )
    commands = parser.add_subparsers(dest="command")
    copy = commands.add_parser(
        "cp", help="copy a shipped config to a file or folder", description="Copy a shipped config to edit it."
    )
    copy.add_argument("name", help="a shipped config, e.g. ulma or strategy/fsdp2 (`ulma configs` lists them)")
    copy.add_argument("dest", help="a file (e.g. my_ulma.yaml) or an existing folder")
    copy.add_argument("--force", action="store_true", help="replace DEST if it exists")
    args = parser.parse_args(argv)
    configs = shipped_configs()
    if args.command is None:
        print(f"configs shipped with ulma-lightning ({shipped_configs_dir()}):")
        for name in configs:
            print(f"  {name}")
        print("use one: ulma fit --config NAME; copy one to edit: ulma configs cp NAME DEST")
        return 0
    source = shipped_config(args.name)
    if source is None:
        parser.exit(2, f"ulma configs cp: no shipped config {args.name!r}; shipped: {', '.join(configs) or '(none)'}\n")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not args.force:
        parser.exit(2, f"ulma configs cp: {dest} exists; pass --force to replace it\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"copied {args.name} to {dest}")
    return 0
