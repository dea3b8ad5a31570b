"""The memory allocator of a benchmark process: glibc's (``default``) or jemalloc through ``LD_PRELOAD``.

On these machines a step that makes and frees large tensors (TRL's ``(batch x seq x vocab)``
logits) spends much of its time in page faults with glibc, which hands freed blocks back to the OS
and faults them in again next step. jemalloc with decay turned off
(``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``) keeps freed pages for reuse. A process reads
``LD_PRELOAD`` when it starts, so a setting applies to processes started after it is set
(:func:`applied`), never to the running one.

The library is found with ``ldconfig -p`` or at the usual Debian/Fedora paths (``apt-get install
libjemalloc2``); ``ULMA_BENCH_JEMALLOC`` names another file. Where it is absent, a request for
``jemalloc`` or ``both`` measures the default allocator only and says so (:func:`resolve`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

SETTINGS = ("default", "jemalloc")
CHOICES = SETTINGS + ("both",)
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
NAME = "libjemalloc.so.2"
CANDIDATES = tuple(
    f"{base}/{NAME}"
    for base in (
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    )
)
INSTALL_HINT = "install it with `apt-get install libjemalloc2` (Debian/Ubuntu) or name the file in ULMA_BENCH_JEMALLOC"


def _ldconfig() -> str:
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def find_jemalloc(
    ldconfig_output: str | None = None,
    candidates: tuple[str, ...] = CANDIDATES,
    environ: Mapping[str, str] = os.environ,
) -> str | None:
    """The path of ``libjemalloc.so.2``, or None where it is not installed."""
    named = environ.get("ULMA_BENCH_JEMALLOC")
    if named:
        return named if Path(named).is_file() else None
    text = _ldconfig() if ldconfig_output is None else ldconfig_output
    for line in text.splitlines():
        if NAME in line and "=>" in line:
            path = line.split("=>", 1)[1].strip()
            if Path(path).is_file():
                return path
    return next((c for c in candidates if Path(c).is_file()), None)


def resolve(choice: str, path: str | None) -> tuple[list[str], str | None]:
    """The settings to measure for ``choice`` (``default``, ``jemalloc`` or ``both``), and a note
    when jemalloc was asked for but is not installed (then only ``default`` is measured)."""
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {', '.join(CHOICES)}, got {choice!r}")
    wanted = list(SETTINGS) if choice == "both" else [choice]
    if "jemalloc" in wanted and path is None:
        return ["default"], f"jemalloc ({NAME}) not found, so only the default allocator was measured: {INSTALL_HINT}"
    return wanted, None


def environment(setting: str, path: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` as a process started with ``setting`` should see it.

    ``jemalloc``: ``path`` first in ``LD_PRELOAD`` and :data:`MALLOC_CONF`; ``default``: any
    jemalloc taken out of ``LD_PRELOAD`` and our ``MALLOC_CONF`` dropped (glibc's malloc).
    """
    env = dict(environ)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "jemalloc" not in Path(p).name]
    if setting == "jemalloc":
        if path is None:
            raise FileNotFoundError(f"jemalloc ({NAME}) not found: {INSTALL_HINT}")
        preload.insert(0, path)
        env["MALLOC_CONF"] = MALLOC_CONF
    elif setting == "default":
        if env.get("MALLOC_CONF") == MALLOC_CONF:
            del env["MALLOC_CONF"]
    else:
        raise ValueError(f"allocator setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env


@contextlib.contextmanager
def applied(setting: str, path: str | None) -> Iterator[None]:
    """``os.environ`` set for ``setting`` inside the block (processes started there inherit it), restored after."""
    saved = dict(os.environ)
    target = environment(setting, path, os.environ)
    try:
        for key in ("LD_PRELOAD", "MALLOC_CONF"):
            if key in target:
                os.environ[key] = target[key]
            else:
                os.environ.pop(key, None)
        yield
    finally:
        for key in ("LD_PRELOAD", "MALLOC_CONF"):
            if key in saved:
                os.environ[key] = saved[key]
            else:
                os.environ.pop(key, None)


def loaded(maps: str | None = None) -> str:
    """The allocator this process runs with: ``jemalloc`` if the library is mapped, else ``default``."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "default"
