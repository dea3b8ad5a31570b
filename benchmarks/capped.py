"""Run a function in a fresh child process under a resident-memory cap; running out is a result, not a crash.

The parent polls the child's resident set (``/proc/PID/status``) and kills it once it passes the
cap (below the machine's memory, so the kernel's OOM killer never picks a process of its own). A
child killed by the cap, by the kernel (SIGKILL) or failing an allocation itself (``MemoryError``,
torch's "can't allocate memory") is returned as ``{"out_of_memory": True, "error": "ran out of
memory at X GiB ..."}``; other exceptions as ``{"error": ...}``. No ``RLIMIT_AS``: torch and
jemalloc reserve far more address space than they touch.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 1024**3
OOM_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(t in str(exc).lower() for t in OOM_TEXTS)


def _child(conn: Any, fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        result = fn(arg)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent as a result
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        if is_out_of_memory(exc):
            result["out_of_memory"] = True
    conn.send(result)
    conn.close()


def _oom(peak: int, cap: int, how: str) -> dict[str, Any]:
    return {
        "out_of_memory": True,
        "peak_rss_gib": peak / GIB,
        "error": f"ran out of memory at {peak / GIB:.1f} GiB ({how}; cap {cap / GIB:.1f} GiB)",
    }


def run_capped(
    fn: Callable[[Any], Any],
    arg: Any,
    cap_bytes: int,
    timeout_s: float = 7200.0,
    poll_s: float = 0.1,
    context: str = "spawn",
) -> dict[str, Any]:
    """``fn(arg)`` (a dict) in a fresh ``context`` child process, killed once its RSS exceeds ``cap_bytes``.

    The result gets ``peak_rss_gib``: the highest RSS the parent saw (sampled every ``poll_s``).
    """
    ctx = mp.get_context(context)
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, arg), daemon=True)
    process.start()
    send.close()
    peak, started = 0, time.monotonic()
    try:
        while True:
            if receive.poll(poll_s):
                result = receive.recv()
                break
            rss = rss_bytes(process.pid) or 0
            peak = max(peak, rss)
            if rss > cap_bytes:
                process.kill()
                process.join(30)
                return _oom(peak, cap_bytes, "killed by the benchmark's memory cap")
            if not process.is_alive():
                process.join(5)
                code = process.exitcode
                if code == -signal.SIGKILL:
                    return _oom(
                        peak, cap_bytes, "the process was killed by SIGKILL, most likely the kernel's OOM killer"
                    )
                return {
                    "error": f"the child process exited with code {code} without a result",
                    "peak_rss_gib": peak / GIB,
                }
            if time.monotonic() - started > timeout_s:
                process.kill()
                process.join(30)
                return {"error": f"no result within {timeout_s:.0f} s", "peak_rss_gib": peak / GIB}
    except (EOFError, OSError) as exc:
        process.kill()
        process.join(30)
        return {"error": f"the child process died: {type(exc).__name__}: {exc}", "peak_rss_gib": peak / GIB}
    process.join(60)
    if process.is_alive():
        process.kill()
    if isinstance(result, dict):
        result.setdefault("peak_rss_gib", peak / GIB)
        result["polled_peak_rss_gib"] = peak / GIB
    return result


def hog(megabytes: int) -> dict[str, Any]:
    """Touch ``megabytes`` MB of memory, 16 MB at a time (a self-check of the cap: see the tests)."""
    blocks = []
    for _ in range(megabytes // 16):
        blocks.append(bytearray(16 * 1024**2))
        blocks[-1][::4096] = b"\x01" * len(blocks[-1][::4096])
        time.sleep(0.005)
    return {"touched_mb": len(blocks) * 16}
