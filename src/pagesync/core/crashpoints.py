"""Crash points: SIGKILL this process at a named point in the page cycle, for crash tests.

Set PAGESYNC_CRASH_AT=POINT:N (e.g. `after_write:3`) and the N-th time the process reaches
POINT it kills itself with SIGKILL, exactly as `kill -9` would, leaving no chance to clean
up. Unset (always, outside tests), a crash point costs one comparison.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = (
    "plan",
    "migrate",
    "before_fetch",
    "after_fetch",
    "after_write",
    "in_commit",
    "after_commit",
    "before_swap",
)

_target: tuple[str, int] | None = None
_counts: dict[str, int] = {}
_lock = threading.Lock()


def load() -> None:
    """Read PAGESYNC_CRASH_AT (at import, and again in a process forked with a new
    environment: the chaos test's runs), and start counting afresh."""
    global _target
    spec = os.environ.get("PAGESYNC_CRASH_AT")
    _target = None
    _counts.clear()
    if spec:
        name, _, n = spec.partition(":")
        if name not in POINTS:
            raise ValueError(
                f"PAGESYNC_CRASH_AT: unknown point {name!r} (points: {', '.join(POINTS)})"
            )
        _target = (name, int(n or 1))


load()


def reached(point: str) -> None:
    """Die here if this is the configured crash point's N-th visit."""
    if _target is None or _target[0] != point:
        return
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] == _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
