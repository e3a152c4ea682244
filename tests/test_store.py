"""The checkpoint store on SQLite, DuckDB, a real PostgreSQL and a real MariaDB: migrations, partition rows, leases
with compare-and-swap commits, merge-patched state, the page log and the high-water mark."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from conftest import PG_ADMIN_URL, drop_mysql_database, mysql_database
from helpers import quoted
from sqlalchemy import inspect, text

from pagesync.core.errors import LeaseLost, StateError
from pagesync.core.store import (
    _ENGINES,
    COMPLETE,
    INCOMPLETE,
    PENDING,
    RUNNING,
    SCHEMA_VERSION,
    Lease,
    Store,
    lease_is_free,
    owner_id,
)

HOST = socket.gethostname()
OTHER = "otherhost:1:-"  # a runner on another machine: its pid cannot be checked from here


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """One PostgreSQL database for this module; each test gets a fresh schema in it
    (creating a database per test would cost most of this module's run time)."""
    name = f"pagesync_store_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def mysql_server() -> Iterator[list[str]]:
    """MariaDB databases made for this module's tests, dropped at its end (a database per
    test: MariaDB's schemas are its databases)."""
    made: list[str] = []
    yield made
    for name in made:
        drop_mysql_database(name)


@pytest.fixture(params=["sqlite", "postgresql", "duckdb", "mariadb"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty state database: a SQLite or DuckDB file, a PostgreSQL schema of its
    own, or a MariaDB database of its own."""
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'state.db'}"
    elif request.param == "duckdb":
        u = f"duckdb:///{tmp_path / 'state.duckdb'}"
    elif request.param == "mariadb":
        name, u = mysql_database("pagesync_store")
        request.getfixturevalue("mysql_server").append(name)
    else:
        database = request.getfixturevalue("pg_database")
        schema = f"s_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(database.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        u = f"{database}?options=-csearch_path%3D{schema}"
    yield u
    engine = _ENGINES.pop(u, None)
    if engine is not None:
        engine.dispose()


@pytest.fixture
def store(url: str) -> Store:
    s = Store(url)
    s.migrate()
    return s


def sql(store: Store, statement: str, **params: Any) -> list[Any]:
    with store.engine.begin() as conn:
        result = conn.execute(text(quoted(store.engine, statement)), params)
        return list(result) if result.returns_rows else []


def row(store: Store, partition: str, stream: str = "items", scope: str = "") -> dict[str, Any]:
    (found,) = [p for p in store.partitions(stream, scope=scope) if p["partition"] == partition]
    return found


def expire(store: Store, partition: str) -> None:
    sql(
        store,
        "UPDATE pagesync_partitions SET lease_expires = :t WHERE {partition} = :p",
        t=time.time() - 60,
        p=partition,
    )


def entry(lease: Lease, page: int, records: int, before: Any = None, after: Any = None) -> dict:
    """A page-log entry shaped as the engine makes it (cursors as JSON text)."""

    def j(v: Any) -> str | None:
        return None if v is None else orjson.dumps(v).decode()

    return {
        "stream": lease.stream, "scope": lease.scope, "partition": lease.partition,
        "page": page, "records": records, "cursor_before": j(before), "cursor_after": j(after),
        "flow_run_id": "run-1", "task_run_id": f"task-{page}",
    }  # fmt: skip


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- migrations ----------------------------------------------------------------------------------


def test_migrate_creates_tables_and_stores_the_version(url: str) -> None:
    store = Store(url)
    with store.engine.connect() as conn:
        assert store.schema_version(conn) == 0
    assert store.migrate() == SCHEMA_VERSION
    tables = set(inspect(store.engine).get_table_names())
    assert {"pagesync_partitions", "pagesync_pages", "pagesync_meta"} <= tables
    assert sql(store, "SELECT {key}, value FROM pagesync_meta") == [
        ("schema_version", str(SCHEMA_VERSION))
    ]
    with store.engine.connect() as conn:
        assert store.schema_version(conn) == SCHEMA_VERSION


def test_migrate_is_idempotent(url: str) -> None:
    first = Store(url)
    first.migrate()
    first.ensure("items", "", ["a"])
    assert first.migrate() == SCHEMA_VERSION
    assert Store(url).migrate() == SCHEMA_VERSION  # another process, same database
    assert sql(first, "SELECT COUNT(*) FROM pagesync_meta") == [(1,)]
    assert [p["partition"] for p in first.partitions("items")] == ["a"]  # nothing was dropped


def test_newer_schema_version_is_refused(url: str) -> None:
    Store(url).migrate()
    sql(
        Store(url),
        "UPDATE pagesync_meta SET value = :v WHERE {key} = 'schema_version'",
        v=str(SCHEMA_VERSION + 1),
    )
    with pytest.raises(StateError, match="newer") as info:
        Store(url).migrate()
    assert str(SCHEMA_VERSION + 1) in str(info.value)


# -- partitions ----------------------------------------------------------------------------------


def test_ensure_adds_pending_rows_once(store: Store) -> None:
    store.ensure("items", "", ["2024-01-01", "2024-01-02", "2024-01-01"])
    rows = store.partitions("items")
    assert [r["partition"] for r in rows] == ["2024-01-01", "2024-01-02"]
    for r in rows:
        assert (r["status"], r["state"], r["version"], r["pages"], r["records"]) == (
            PENDING, {}, 0, 0, 0,
        )  # fmt: skip
        assert r["lease_owner"] is None

    lease = store.try_acquire("items", "", "2024-01-01", owner_id("run-1"))
    assert lease is not None
    store.commit(lease, patch={"cursor": "c"}, status=RUNNING)
    store.ensure("items", "", ["2024-01-01", "2024-01-02", "2024-01-03"])
    rows = store.partitions("items")
    assert [r["partition"] for r in rows] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert rows[0]["state"] == {"cursor": "c"}  # an existing row is left as it is
    assert rows[0]["status"] == RUNNING
    assert store.count_partitions("items") == 3


def test_ensure_keeps_scopes_apart(store: Store) -> None:
    store.ensure("items", "", ["a"])
    store.ensure("items", "backfill-1", ["a", "b"])
    assert [r["partition"] for r in store.partitions("items")] == ["a"]
    assert [r["partition"] for r in store.partitions("items", scope="backfill-1")] == ["a", "b"]
    assert len(store.partitions("items", scope=None)) == 3


def test_partitions_read_by_key(store: Store) -> None:
    """What a fan-out coordinator polls: the partitions in flight, not the whole stream."""
    store.ensure("items", "", ["a", "b", "c", "d"])
    store.ensure("items", "backfill-1", ["b"])
    assert [r["partition"] for r in store.partitions("items", keys=["d", "b"])] == ["b", "d"]
    assert [r["scope"] for r in store.partitions("items", scope=None, keys=["b"])] == [
        "",
        "backfill-1",
    ]
    assert store.partitions("items", keys=[]) == []


# -- leases --------------------------------------------------------------------------------------


def test_acquire_takes_a_free_partition(store: Store) -> None:
    store.ensure("items", "", ["p"])
    me = owner_id("run-1")
    before = time.time()
    lease = store.try_acquire("items", "", "p", me)
    assert lease is not None
    assert (lease.owner, lease.version, lease.status, lease.state) == (me, 1, PENDING, {})
    r = row(store, "p")
    assert r["lease_owner"] == me
    assert r["version"] == 1
    assert r["lease_expires"] >= before + store.lease_ttl


def test_live_lease_blocks_another_owner(store: Store) -> None:
    store.ensure("items", "", ["p"])
    held = store.try_acquire("items", "", "p", OTHER)
    assert held is not None
    assert store.try_acquire("items", "", "p", owner_id("run-1")) is None
    # A live local process (this one) holding it under another flow run blocks too.
    store.ensure("items", "", ["q"])
    assert store.try_acquire("items", "", "q", owner_id("run-a")) is not None
    assert store.try_acquire("items", "", "q", owner_id("run-b")) is None
    assert row(store, "p")["lease_owner"] == OTHER
    assert row(store, "p")["version"] == 1  # refused attempts change nothing


def test_owner_can_reacquire_its_own_lease(store: Store) -> None:
    store.ensure("items", "", ["p"])
    me = owner_id("run-1")
    first = store.try_acquire("items", "", "p", me)
    again = store.try_acquire("items", "", "p", me)
    assert first is not None and again is not None
    assert again.version == first.version + 1


def test_expired_lease_can_be_taken_over(store: Store) -> None:
    store.ensure("items", "", ["p"])
    old = store.try_acquire("items", "", "p", OTHER)
    assert old is not None
    expire(store, "p")
    me = owner_id("run-1")
    lease = store.try_acquire("items", "", "p", me)
    assert lease is not None
    assert lease.version == old.version + 1
    assert row(store, "p")["lease_owner"] == me


def test_tiny_lease_ttl_expires(url: str) -> None:
    short = Store(url, lease_ttl=-1.0)  # expired the moment it is taken
    short.migrate()
    short.ensure("items", "", ["p"])
    assert short.try_acquire("items", "", "p", OTHER) is not None
    assert short.try_acquire("items", "", "p", owner_id("run-1")) is not None


def test_stale_lease_commit_is_refused_and_changes_nothing(store: Store) -> None:
    store.ensure("items", "", ["p"])
    stale = store.try_acquire("items", "", "p", OTHER)
    assert stale is not None
    stale.log.append(entry(stale, 1, 10, None, "2024-01-01"))
    store.commit(stale, patch={"cursor": "2024-01-01", "page": 1}, status=RUNNING)

    expire(store, "p")
    fresh = store.try_acquire("items", "", "p", owner_id("run-2"))
    assert fresh is not None
    fresh.log.append(entry(fresh, 2, 5, "2024-01-01", "2024-01-05"))
    store.commit(fresh, patch={"cursor": "2024-01-05", "page": 2})
    before = row(store, "p")
    history = store.history("items")

    stale.log.append(entry(stale, 2, 99, "2024-01-01", "2099-01-01"))
    stale_copy = (stale.version, dict(stale.state), stale.pages, stale.records)
    with pytest.raises(LeaseLost, match="partition p of stream items"):
        store.commit(
            stale, patch={"cursor": "2099-01-01", "page": 2}, status=COMPLETE, release=True
        )

    after = row(store, "p")
    assert after == before
    assert after["state"] == {"cursor": "2024-01-05", "page": 2}
    assert (after["pages"], after["records"], after["status"]) == (2, 15, RUNNING)
    assert store.history("items") == history  # the stale page log rows rolled back
    assert [h["records"] for h in history] == [10, 5]
    # The stale copy did not move either.
    assert (stale.version, stale.state, stale.pages, stale.records) == stale_copy


def test_commit_after_takeover_by_same_owner_string_elsewhere_is_refused(store: Store) -> None:
    """The CAS is on the version: an old Lease of the same owner is stale too."""
    store.ensure("items", "", ["p"])
    me = owner_id("run-1")
    first = store.try_acquire("items", "", "p", me)
    second = store.try_acquire("items", "", "p", me)
    assert first is not None and second is not None
    with pytest.raises(LeaseLost):
        store.commit(first, patch={"cursor": 1})
    store.commit(second, patch={"cursor": 2})
    assert row(store, "p")["state"] == {"cursor": 2}


def test_dead_local_pid_lease_is_free(store: Store) -> None:
    store.ensure("items", "", ["p", "q"])
    pid = dead_pid()
    dead = f"{HOST}:{pid}:-"
    assert store.try_acquire("items", "", "p", dead) is not None
    me = owner_id()
    lease = store.try_acquire("items", "", "p", me)
    assert lease is not None
    assert row(store, "p")["lease_owner"] == me
    # The same dead pid on another host cannot be checked from here: still held.
    assert store.try_acquire("items", "", "q", f"otherhost:{pid}:-") is not None
    assert store.try_acquire("items", "", "q", me) is None


def test_same_flow_run_takes_over(store: Store) -> None:
    store.ensure("items", "", ["p"])
    assert store.try_acquire("items", "", "p", "hostA:4242:flow-run-9") is not None
    assert store.try_acquire("items", "", "p", "hostB:77:flow-run-10") is None
    lease = store.try_acquire("items", "", "p", "hostB:77:flow-run-9")
    assert lease is not None
    assert row(store, "p")["lease_owner"] == "hostB:77:flow-run-9"


def test_released_lease_is_free(store: Store) -> None:
    store.ensure("items", "", ["p"])
    lease = store.try_acquire("items", "", "p", OTHER)
    assert lease is not None
    store.commit(lease, patch={}, release=True)
    r = row(store, "p")
    assert (r["lease_owner"], r["lease_expires"]) == (None, None)
    assert store.try_acquire("items", "", "p", owner_id("run-1")) is not None


@pytest.mark.parametrize(
    ("owner", "expires", "me", "free"),
    [
        (None, None, "h:1:-", True),
        ("h:2:-", None, "h:1:-", True),
        ("h:2:-", 50.0, "h:1:-", True),  # expired (now = 100)
        ("h:1:r", 500.0, "h:1:r", True),  # ourselves
        ("x:2:r", 500.0, "h:1:r", True),  # the same flow run, retried elsewhere
        ("x:2:-", 500.0, "h:1:-", False),  # "-" is no flow run: never a match
        ("x:2:r1", 500.0, "h:1:r2", False),
        ("x:junk", 500.0, "h:1:-", False),
    ],
)
def test_lease_is_free_rules(owner: str | None, expires: float | None, me: str, free: bool) -> None:
    assert lease_is_free(owner, expires, me, now=100.0) is free


# -- commits ---------------------------------------------------------------------------------------


def test_commit_applies_merge_patches_and_counts_pages(store: Store) -> None:
    store.ensure("items", "", ["p"])
    lease = store.try_acquire("items", "", "p", owner_id("run-1"))
    assert lease is not None
    lease.log += [entry(lease, 1, 3, None, "c1"), entry(lease, 2, 4, "c1", "c2")]
    store.commit(lease, patch={"cursor": "c2", "next": "tok-3", "page": 2, "sorted": True},
                 status=RUNNING)  # fmt: skip
    r = row(store, "p")
    assert r["state"] == {"cursor": "c2", "next": "tok-3", "page": 2, "sorted": True}
    assert (r["status"], r["pages"], r["records"], r["version"]) == (RUNNING, 2, 7, 2)
    assert (lease.version, lease.pages, lease.records, lease.log) == (2, 2, 7, [])
    assert lease.state == r["state"]

    lease.log.append(entry(lease, 3, 1, "c2", "c3"))
    store.commit(lease, patch={"cursor": "c3", "next": None, "page": 3, "done": True},
                 status=COMPLETE, release=True)  # fmt: skip
    r = row(store, "p")
    assert r["state"] == {"cursor": "c3", "page": 3, "sorted": True, "done": True}
    assert (r["status"], r["pages"], r["records"], r["version"]) == (COMPLETE, 3, 8, 3)
    assert (r["lease_owner"], r["lease_expires"], r["error"]) == (None, None, None)


def test_commit_records_and_clears_errors(store: Store) -> None:
    store.ensure("items", "", ["p"])
    lease = store.try_acquire("items", "", "p", owner_id("run-1"))
    assert lease is not None
    store.commit(lease, patch={}, status=INCOMPLETE, error="HTTP 503 after 5 tries", release=True)
    r = row(store, "p")
    assert (r["status"], r["error"]) == (INCOMPLETE, "HTTP 503 after 5 tries")
    lease = store.try_acquire("items", "", "p", owner_id("run-2"))
    assert lease is not None and lease.status == INCOMPLETE
    store.commit(lease, patch={"done": True}, status=COMPLETE, release=True)
    assert row(store, "p")["error"] is None


def test_commit_renews_the_lease(store: Store) -> None:
    store.ensure("items", "", ["p"])
    lease = store.try_acquire("items", "", "p", OTHER)
    assert lease is not None
    expire(store, "p")
    store.commit(lease, patch={"page": 1})  # still ours: nobody took it in between
    assert row(store, "p")["lease_expires"] > time.time()
    assert store.try_acquire("items", "", "p", owner_id("run-1")) is None


def test_write_rolled_back_by_the_caller_leaves_the_lease_usable(store: Store) -> None:
    """write() runs inside the caller's transaction; when that transaction rolls back
    (the commit failed after it), our copy of the lease must still match the database."""
    store.ensure("items", "", ["p"])
    lease = store.try_acquire("items", "", "p", owner_id("run-1"))
    assert lease is not None
    lease.log.append(entry(lease, 1, 3))
    with pytest.raises(RuntimeError), store.writing() as conn:
        store.write(conn, lease, patch={"cursor": "c1", "page": 1})
        raise RuntimeError("COMMIT failed")
    r = row(store, "p")
    assert (r["version"], r["state"], r["pages"]) == (1, {}, 0)
    assert (lease.version, lease.state, lease.pages) == (r["version"], r["state"], r["pages"])
    store.commit(lease, patch={"cursor": "c1", "page": 1})
    assert row(store, "p")["state"] == {"cursor": "c1", "page": 1}


# -- reading back --------------------------------------------------------------------------------


def test_history_returns_the_page_log(store: Store) -> None:
    store.ensure("items", "", ["a"])
    store.ensure("items", "bf", ["a"])
    store.ensure("other", "", ["a"])
    for stream, scope, cursors in [("items", "", [5, 9]), ("items", "bf", [2]), ("other", "", [1])]:
        lease = store.try_acquire(stream, scope, "a", owner_id("run-1"))
        assert lease is not None
        prev = None
        for page, cursor in enumerate(cursors, 1):
            lease.log.append(entry(lease, page, 10 * page, prev, {"at": cursor}))
            prev = {"at": cursor}
        store.commit(lease, patch={"page": len(cursors)})

    history = store.history("items")
    assert [(h["scope"], h["page"], h["records"]) for h in history] == [
        ("", 1, 10), ("", 2, 20), ("bf", 1, 10),
    ]  # fmt: skip
    assert history[0]["cursor_before"] is None
    assert history[0]["cursor_after"] == {"at": 5}
    assert history[1]["cursor_before"] == {"at": 5}
    assert history[1]["task_run_id"] == "task-2"
    assert history[1]["flow_run_id"] == "run-1"
    assert history[1]["committed_at"] is not None
    assert [h["page"] for h in store.history("items", scope="bf")] == [1]
    assert len(store.history("other")) == 1
    assert store.history("nothing") == []


def _finish(store: Store, scope: str, partition: str, cursor: Any, status: str) -> None:
    lease = store.try_acquire("items", scope, partition, owner_id("run-1"))
    assert lease is not None
    store.commit(lease, patch={"cursor": cursor}, status=status, release=True)


def test_high_water_mark_over_complete_partitions_only(store: Store) -> None:
    assert store.high_water_mark("items") is None
    store.ensure("items", "", ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"])
    store.ensure("items", "backfill-1", ["2023-12-01"])
    _finish(store, "", "2024-01-01", "2024-01-01T10:00:00Z", RUNNING)
    assert store.high_water_mark("items") is None  # nothing complete yet
    _finish(store, "", "2024-01-01", "2024-01-01T23:00:00Z", COMPLETE)
    _finish(store, "", "2024-01-02", "2024-01-02T05:00:00Z", COMPLETE)
    _finish(store, "", "2024-01-03", "2024-01-03T09:00:00Z", INCOMPLETE)
    _finish(store, "", "2024-01-04", "2024-01-04T09:00:00Z", RUNNING)
    _finish(store, "backfill-1", "2023-12-01", "2023-12-01T12:00:00Z", COMPLETE)
    assert store.high_water_mark("items") == "2024-01-02T05:00:00Z"


def test_high_water_mark_compares_numbers_as_numbers(store: Store) -> None:
    store.ensure("items", "", ["a", "b", "c"])
    _finish(store, "", "a", 9, COMPLETE)
    _finish(store, "", "b", 10, COMPLETE)
    _finish(store, "", "c", 1000, INCOMPLETE)
    assert store.high_water_mark("items") == 10


def test_reset_forgets_partitions_and_log(store: Store) -> None:
    store.ensure("items", "", ["a"])
    store.ensure("items", "bf", ["a"])
    lease = store.try_acquire("items", "", "a", owner_id("run-1"))
    assert lease is not None
    lease.log.append(entry(lease, 1, 1))
    store.commit(lease, patch={})
    assert store.reset("items", scope="bf") == 1
    assert store.count_partitions("items") == 1
    assert store.reset("items") == 1
    assert store.count_partitions("items") == 0
    assert store.history("items") == []


def test_threads_asking_for_one_url_at_once_share_one_engine(tmp_path: Path) -> None:
    """The CLI warms a run's engines on a thread while the flow run starts; the run's own
    threads ask for the same URLs, maybe at the same moment: one engine, one pool."""
    import threading

    from pagesync.core import store as store_mod

    url = f"sqlite:///{tmp_path / 'one.db'}"
    go = threading.Barrier(8)
    got: list[object] = []

    def ask() -> None:
        go.wait()
        got.append(store_mod.engine_for(url))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(e is got[0] for e in got)
    assert store_mod.engine_for(url) is got[0]


def test_warming_leaves_errors_to_the_run(tmp_path: Path) -> None:
    """A URL that cannot be opened is not the warm-up's to report: it ends quietly and
    the store, opened by the run, raises as it always did."""
    from pagesync.core.store import warm_engines

    good = f"sqlite:///{tmp_path / 'ok.db'}"
    bad = "postgresql+nosuchdriver://u@127.0.0.1:1/x"
    warm_engines(bad, good).join(30)
    assert (tmp_path / "ok.db").exists()  # the good one was opened
    with pytest.raises(Exception, match="nosuchdriver"):
        Store(bad)
