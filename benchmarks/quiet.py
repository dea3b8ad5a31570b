"""Other processes' CPU use, so that timed steps run while the shared machine is quiet.

With 2 torch threads on 2 cores, one busy neighbour stalls every parallel region of a step until
the scheduler gives the waiting thread its core back; a step of many small ops (as ours) can then
take 10-30x longer, one of a few large ops much less. The benchmark therefore waits (a bounded
time, see :class:`Gate`) for a quiet moment before each timed step, measures the foreign CPU use
during the step, and runs a disturbed step once more if the machine had been quiet just before it
(a neighbour that just started); what remains is recorded per step. Other processes include other
containers' (``/proc/stat`` counts the whole machine), which ``top`` does not list.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET_CORES = 0.25  # foreign CPU use (in cores) below which the machine counts as quiet


def _busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (None off Linux)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / TICK


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Snapshot:
    wall: float
    busy: float | None
    own: float

    @classmethod
    def take(cls) -> Snapshot:
        return cls(time.perf_counter(), _busy_s(), _own_s())

    def foreign_cores(self) -> float:
        """Mean CPU use by other processes since the snapshot, in cores (0 where unknown)."""
        now = Snapshot.take()
        if self.busy is None or now.busy is None or now.wall <= self.wall:
            return 0.0
        return max(0.0, (now.busy - self.busy) - (now.own - self.own)) / (now.wall - self.wall)


class Gate:
    """Waits for a quiet machine before each timed step, with patience that adapts.

    The first wait may last ``long_s``; once a wait times out (a neighbour is busy for a long
    stretch), later waits last at most ``short_s`` until the machine is found quiet again, so a
    busy spell costs one long wait, not one per step.
    """

    def __init__(self, long_s: float = 10.0, short_s: float = 1.0, window_s: float = 0.1) -> None:
        self.long_s, self.short_s, self.window_s = long_s, short_s, window_s
        self.patient = True

    def wait(self) -> tuple[float, bool]:
        """Sleep until quiet or out of patience; returns (seconds waited, found quiet)."""
        limit = self.long_s if self.patient else self.short_s
        start = time.perf_counter()
        while time.perf_counter() - start < limit:
            snap = Snapshot.take()
            time.sleep(self.window_s)
            if snap.foreign_cores() < QUIET_CORES:
                self.patient = True
                return time.perf_counter() - start, True
        self.patient = False
        return time.perf_counter() - start, False


def wait_quiet(max_wait_s: float, window_s: float = 0.3) -> float:
    """Sleep until other processes use under ``QUIET_CORES`` for ``window_s`` (at most ``max_wait_s``).

    Returns the seconds waited.
    """
    return Gate(max_wait_s, max_wait_s, window_s).wait()[0]
