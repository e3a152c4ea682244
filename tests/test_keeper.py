"""LeaseKeeper: a held lease outlives its TTL while the keeper renews it, and only then.

Against real SQLite and PostgreSQL stores; a 2-second TTL, so renewals come every 0.67 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import wait_for

from pagesync.core.keeper import LeaseKeeper
from pagesync.core.store import Store

TTL = 2.0


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = Store(url, lease_ttl=TTL)
    s.migrate()
    s.ensure("s", "", ["p"])
    return s


def _expires(store: Store) -> float:
    return store.partitions("s")[0]["lease_expires"]


def test_renewal_keeps_the_lease_past_its_ttl_and_stops_with_the_partition(store: Store) -> None:
    lease = store.try_acquire("s", "", "p", "host:1:a")
    assert lease is not None
    keeper = LeaseKeeper()
    began = time.time()
    with keeper.holding(store, lease):
        # Past two TTLs, the lease is still unexpired: it was renewed, not just taken.
        wait_for(lambda: time.time() > began + 2 * TTL + 0.5, timeout=10, what="two TTLs")
        assert _expires(store) > time.time()
        assert store.try_acquire("s", "", "p", "other:2:b") is None
    stopped_at = _expires(store)
    # Stopped: the expiry no longer moves, the lease runs out and another runner takes it.
    taken = wait_for(
        lambda: store.try_acquire("s", "", "p", "other:2:b"), timeout=3 * TTL, what="takeover"
    )
    assert time.time() >= stopped_at
    assert taken.owner == "other:2:b"


def test_renewal_does_not_fail_a_checkpoint(store: Store) -> None:
    """Renewals leave the version alone, so the holder's commits still pass their CAS."""
    lease = store.try_acquire("s", "", "p", "host:1:a")
    assert lease is not None
    keeper = LeaseKeeper()
    with keeper.holding(store, lease):
        for page in range(1, 6):
            before = _expires(store)
            wait_for(lambda b=before: _expires(store) > b, timeout=TTL, what="a renewal")
            store.commit(lease, patch={"page": page})
    assert store.partitions("s")[0]["state"]["page"] == 5


def test_a_lost_cas_stops_the_keeper(store: Store) -> None:
    lease = store.try_acquire("s", "", "p", "host:1:a")
    assert lease is not None
    # Another runner takes it over (as after an expiry): the keeper's CAS finds a new owner.
    with store.writing() as conn:
        conn.exec_driver_sql("UPDATE pagesync_partitions SET lease_expires = 0")
    other = store.try_acquire("s", "", "p", "other:2:b")
    assert other is not None
    keeper = LeaseKeeper()
    with keeper.holding(store, lease) as held:
        wait_for(lambda: held.lost, timeout=2 * TTL, what="the keeper to give up")
        row = store.partitions("s")[0]
    assert row["lease_owner"] == "other:2:b"
    assert row["version"] == other.version
