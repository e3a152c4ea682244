"""Keep held leases alive between checkpoints.

A checkpoint renews its partition's lease, but a page slower than the lease's TTL (a slow
API, a long retry backoff) would let the lease expire mid-page and another runner take the
partition over, wasting the page. The keeper renews every held lease every third of its
TTL from one daemon thread per process, and stops the moment the partition ends. A runner
that dies (SIGKILL, a lost machine) stops renewing with it, so its partitions are free to
take over after at most one TTL. Renewal is never what keeps two runners apart: the
version compare-and-swap of every checkpoint is (`Store.write`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .store import Lease, Store

log = logging.getLogger("pagesync")


@dataclass(eq=False)
class _Held:
    store: Store
    lease: Lease
    due: float
    #: Set when a renewal found the lease taken over or released: renewing stops.
    lost: bool = False


class LeaseKeeper:
    """Renews the leases registered with `holding()` every ttl/3 from one daemon thread."""

    def __init__(self) -> None:
        self._held: set[_Held] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, store: Store, lease: Lease) -> Iterator[_Held]:
        """Renew `lease` while the block runs; not a moment after it ends."""
        held = _Held(store, lease, time.monotonic() + lease.ttl / 3)
        with self._lock:
            self._held.add(held)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="pagesync-lease-keeper", daemon=True
                )
                self._thread.start()
        self._wake.set()
        try:
            yield held
        finally:
            with self._lock:
                self._held.discard(held)

    def _loop(self) -> None:
        while True:
            with self._lock:
                held = list(self._held)
            if not held:
                self._wake.wait(5.0)
                self._wake.clear()
                continue
            now = time.monotonic()
            for h in held:
                if h.due <= now:
                    self._renew(h)
            with self._lock:
                dues = [h.due for h in self._held]
            self._wake.wait(max(0.0, min(dues, default=now + 5.0) - time.monotonic()))
            self._wake.clear()

    def _renew(self, h: _Held) -> None:
        h.due = time.monotonic() + h.lease.ttl / 3
        with self._lock:
            if h not in self._held:
                return  # the partition ended while we were on the way
        try:
            ok = h.store.renew(h.lease)
        except Exception:  # the database is away: try again at the next tick
            log.warning("renewing the lease of partition %s failed", h.lease.partition,
                        exc_info=True)  # fmt: skip
            return
        if not ok:
            h.lost = True
            with self._lock:
                self._held.discard(h)
            log.info("partition %s: lease no longer held by %s; renewal stopped",
                     h.lease.partition, h.lease.owner)  # fmt: skip


#: The process's keeper: one thread for every partition this process runs.
KEEPER = LeaseKeeper()
