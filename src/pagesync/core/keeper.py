"""Keep held leases alive between checkpoints.

A checkpoint renews its partition's lease, but a page slower than the lease's TTL (a slow
API, a long retry backoff) would let the lease expire mid-page and another runner take the
partition over, wasting the page. The keeper renews every held lease every third of its
TTL from one daemon thread per process, and stops the moment the partition ends. A runner
that dies (SIGKILL, a lost machine) stops renewing with it, so its partitions are free to
take over after at most one TTL. Renewal is never what keeps two runners apart: the
version compare-and-swap of every checkpoint is (`Store.write`).

A replace stream's refresh lock (`Store.lock_stream`), held for a whole run, is renewed the
same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial

from .store import Lease, Store, StreamLock

log = logging.getLogger("pagesync")


@dataclass(eq=False)
class _Held:
    #: What is held, for the log: "partition KEY", "stream NAME".
    what: str
    renew: Callable[[], bool]
    ttl: float
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

    def holding(self, store: Store, lease: Lease | StreamLock) -> AbstractContextManager[_Held]:
        """Renew `lease` (a partition's, or a stream's lock) while the block runs; not a
        moment after it ends."""
        if isinstance(lease, StreamLock):
            return self._keeping(f"stream {lease.stream}", partial(store.renew_lock, lease),
                                 lease.ttl)  # fmt: skip
        return self._keeping(f"partition {lease.partition}", partial(store.renew, lease), lease.ttl)

    @contextmanager
    def _keeping(self, what: str, renew: Callable[[], bool], ttl: float) -> Iterator[_Held]:
        held = _Held(what, renew, ttl, time.monotonic() + ttl / 3)
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
        h.due = time.monotonic() + h.ttl / 3
        with self._lock:
            if h not in self._held:
                return  # the partition ended while we were on the way
        try:
            ok = h.renew()
        except Exception:  # the database is away: try again at the next tick
            log.warning("renewing the lease of %s failed", h.what, exc_info=True)
            return
        if not ok:
            h.lost = True
            with self._lock:
                self._held.discard(h)
            log.info("%s: lease no longer held by this runner; renewal stopped", h.what)


#: The process's keeper: one thread for every partition this process runs.
KEEPER = LeaseKeeper()
