"""The checkpoint store: partition state, the page log, leases and schema migrations.

Tables are declared with sqlmodel; the per-page path uses SQLAlchemy Core statements
compiled once, because it runs once per page and must cost little. Every state change
of a partition is a compare-and-swap on its `version`, so a runner that lost its lease
can never overwrite newer progress.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    DefaultClause,
    Double,
    Engine,
    Float,
    MetaData,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateSequence, Sequence
from sqlmodel import AutoString, Field, SQLModel

from . import crashpoints, dialects, mergepatch
from .dbapi import run_on_driver
from .errors import LeaseLost, StateError
from .procs import alive

SCHEMA_VERSION = 1

PENDING, RUNNING, COMPLETE, INCOMPLETE = "pending", "running", "complete", "incomplete"


def utcnow() -> datetime:
    return datetime.now(UTC)


# Types as on SQLite and PostgreSQL (VARCHAR, FLOAT, TIMESTAMP), with what MySQL/MariaDB and
# DuckDB need: MySQL's VARCHAR needs a length (255: three key columns fit InnoDB's 3072-byte
# key in utf8mb4) and documents need LONGTEXT; FLOAT is 4 bytes on both, too coarse for a
# lease's expiry in epoch seconds; MySQL's DATETIME keeps no fraction unless asked.
_TEXT = AutoString().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_EPOCH = Float().with_variant(Double(), "mysql", "mariadb", "duckdb")
_STAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class PartitionRow(SQLModel, table=True):
    """One partition of a stream: where it is, who holds it, what it has committed."""

    __tablename__ = "pagesync_partitions"

    stream: str = Field(primary_key=True)
    #: "" for the stream's own runs; a backfill id for a backfill's windows.
    scope: str = Field(default="", primary_key=True)
    partition: str = Field(primary_key=True)
    status: str = Field(default=PENDING, index=True)
    #: The checkpoint document (JSON): cursor, next token, page, sorted, ... Changed by merge patches.
    state: str = Field(default="{}", sa_type=_TEXT)
    version: int = 0
    pages: int = 0
    records: int = 0
    lease_owner: str | None = None
    lease_expires: float | None = Field(default=None, sa_type=_EPOCH)
    error: str | None = Field(default=None, sa_type=_TEXT)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_STAMP)


class PageLogRow(SQLModel, table=True):
    """Append-only: one row per committed page, written in the checkpoint's transaction."""

    __tablename__ = "pagesync_pages"

    id: int | None = Field(default=None, primary_key=True)
    stream: str = Field(index=True)
    scope: str = ""
    partition: str
    page: int
    records: int
    cursor_before: str | None = Field(default=None, sa_type=_TEXT)
    cursor_after: str | None = Field(default=None, sa_type=_TEXT)
    flow_run_id: str | None = None
    task_run_id: str | None = None
    committed_at: datetime = Field(default_factory=utcnow, sa_type=_STAMP)


class MetaRow(SQLModel, table=True):
    __tablename__ = "pagesync_meta"

    key: str = Field(primary_key=True)
    value: str = Field(sa_type=_TEXT)


P = PartitionRow.__table__  # type: ignore[attr-defined]
L = PageLogRow.__table__  # type: ignore[attr-defined]
M = MetaRow.__table__  # type: ignore[attr-defined]


def _sqlite_setup(engine: Engine) -> None:
    """WAL (readers never block the writer), a busy timeout, and BEGIN IMMEDIATE.

    pysqlite's own transaction handling starts transactions lazily and can fail to upgrade
    a read lock; taking the write lock at BEGIN makes every commit wait its turn instead.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        readonly = conn.get_execution_options().get("readonly")
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()  # one engine per URL, whichever thread asks first
_WRITE_LOCKS: dict[str, threading.Lock] = {}


def write_lock(engine: Engine) -> AbstractContextManager[Any]:
    """Queue this process's SQLite writers on a lock instead of in SQLite's busy handler,
    which sleeps up to 100 ms between tries; DuckDB's writers too, whose concurrent
    transactions fail on conflict instead of waiting. PostgreSQL and MySQL need no such
    thing."""
    if engine.dialect.name not in dialects.SINGLE_WRITER:
        return nullcontext()
    return _WRITE_LOCKS.setdefault(str(engine.url), threading.Lock())


def engine_for(url: str) -> Engine:
    """One engine per database URL per process, set up for pagesync's access pattern."""
    with _ENGINES_LOCK:
        if url not in _ENGINES:
            _ENGINES[url] = _create_engine(url)
        return _ENGINES[url]


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_setup(engine)
        return engine
    if url.startswith("duckdb"):
        # One process holds a DuckDB file; its connections share one database instance.
        return create_engine(url)
    if url.startswith(("mysql", "mariadb")):
        parsed = make_url(url)
        if "charset" not in parsed.query:
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
        # READ COMMITTED: a CAS reads the latest version, and no gap locks between the
        # partitions' page-log inserts.
        return create_engine(
            parsed, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_recycle=3600,
            isolation_level="READ COMMITTED",
        )  # fmt: skip
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def warm_engines(*urls: str) -> threading.Thread:
    """Create the engines of `urls` and open a first connection on a thread of their own.

    Creating one imports its dialect (tens of ms for SQLite's); started while a run waits
    on the Prefect API for its flow run, that is done by the time the store is opened.
    Errors are left for the run itself to meet and report.
    """

    def warm() -> None:
        for url in dict.fromkeys(urls):
            try:
                with engine_for(url).connect():
                    pass
            except Exception:  # the run opens it again and reports what is wrong
                pass

    thread = threading.Thread(target=warm, name="pagesync-warm-engines", daemon=True)
    thread.start()
    return thread


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(value: str | None) -> Any:
    return orjson.loads(value) if value else None


# Migrations: MIGRATIONS[n] takes the store from version n to n + 1, inside one transaction.
Migration = Callable[[Connection], None]


def _v0_to_v1(conn: Connection) -> None:
    if conn.dialect.name != "duckdb":
        SQLModel.metadata.create_all(conn, tables=[P, L, M])
        return
    # DuckDB has no SERIAL: the page log's id comes from a sequence of its own.
    seq = Sequence("pagesync_pages_id_seq")
    conn.execute(CreateSequence(seq, if_not_exists=True))
    log = L.to_metadata(MetaData())
    log.c.id.server_default = DefaultClause(text("nextval('pagesync_pages_id_seq')"))
    log.c.id.autoincrement = False
    SQLModel.metadata.create_all(conn, tables=[P, M])
    log.create(conn, checkfirst=True)


MIGRATIONS: list[Migration] = [_v0_to_v1]


def patch_all_states(
    conn: Connection, make_patch: Callable[[dict[str, Any]], dict[str, Any]]
) -> int:
    """For migrations: apply a merge patch (computed per row) to every partition's state."""
    rows = conn.execute(select(P.c.stream, P.c.scope, P.c.partition, P.c.state)).all()
    for stream, scope, partition, state in rows:
        doc = loads(state) or {}
        conn.execute(
            update(P)
            .where(P.c.stream == stream, P.c.scope == scope, P.c.partition == partition)
            .values(state=dumps(mergepatch.apply(doc, make_patch(doc))), version=P.c.version + 1)
        )
    return len(rows)


def owner_id(flow_run_id: str | None = None) -> str:
    """host:pid:flow-run: enough to tell a dead local runner or a retried flow run."""
    return f"{socket.gethostname()}:{os.getpid()}:{flow_run_id or '-'}"


def lease_is_free(owner: str | None, expires: float | None, me: str, now: float) -> bool:
    """Whether `me` may take a partition held by `owner` until `expires`."""
    if not owner or expires is None or expires <= now or owner == me:
        return True
    host, _, rest = owner.partition(":")
    pid, _, flow_run = rest.partition(":")
    my_host, _, my_rest = me.partition(":")
    my_flow_run = my_rest.partition(":")[2]
    if flow_run != "-" and flow_run == my_flow_run:
        return True  # the same flow run, retried: its earlier attempt is over
    return host == my_host and pid.isdigit() and not alive(int(pid))


@dataclass
class Lease:
    """A held partition: the version we last wrote, and our copy of its state."""

    stream: str
    scope: str
    partition: str
    owner: str
    version: int
    status: str
    state: dict[str, Any]
    pages: int
    records: int
    ttl: float
    log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StreamLock:
    """A stream held by one run as a whole (a replace stream's refresh), kept in
    pagesync_meta as `owner` and expiry: taken, renewed and released by the owner alone."""

    stream: str
    owner: str
    ttl: float

    #: The pagesync_meta key of a stream's lock is this prefix and the stream's name.
    PREFIX = "refresh lock: "

    @property
    def key(self) -> str:
        return f"{self.PREFIX}{self.stream}"

    def value(self, now: float) -> str:
        return f"{self.owner}\n{now + self.ttl!r}"


def _lock_holder(value: str) -> tuple[str, float]:
    owner, _, expires = value.partition("\n")
    return owner, float(expires or 0)


class _CheckpointSQL:
    """The two statements of every checkpoint (page log rows, then the compare-and-swap),
    as the driver's SQL text, for `run_on_driver` inside the caller's transaction.

    Built through SQLAlchemy each time they cost more CPU than the page's records (measured:
    about 2 ms a page, expressions, cache keys and bind processing); the text is fixed, so
    it is made once, and values are bound the way SQLAlchemy binds them (the column types'
    own bind processors, so stored datetimes read back as they always did).
    """

    LOG = ("stream", "scope", "partition", "page", "records", "cursor_before", "cursor_after",
           "flow_run_id", "task_run_id", "committed_at")  # fmt: skip

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        q = dialect.identifier_preparer.quote_identifier
        mark = dialects.named_mark(dialect.paramstyle)
        stamp_type = L.c.committed_at.type.dialect_impl(dialect)
        self.stamp = stamp_type.bind_processor(dialect) or (lambda v: v)
        self.log = (
            f"INSERT INTO {q(L.name)} ({', '.join(map(q, self.LOG))}) "
            f"VALUES ({', '.join(mark(c) for c in self.LOG)})"
        )
        self.cas = (
            f"UPDATE {q(P.name)} SET {q('state')} = {mark('state')}, "
            f"{q('version')} = {mark('version')}, {q('pages')} = {mark('pages')}, "
            f"{q('records')} = {mark('records')}, {q('updated_at')} = {mark('updated_at')}, "
            f"{q('lease_expires')} = {mark('lease_expires')}, "
            f"{q('lease_owner')} = CASE WHEN {mark('release')} = 1 THEN NULL ELSE "
            f"{q('lease_owner')} END, "
            f"{q('status')} = COALESCE({mark('status')}, {q('status')}), "
            f"{q('error')} = CASE WHEN {mark('set_error')} = 1 THEN {mark('error')} ELSE "
            f"{q('error')} END "
            f"WHERE {q('stream')} = {mark('w_stream')} AND {q('scope')} = {mark('w_scope')} "
            f"AND {q('partition')} = {mark('w_partition')} AND {q('version')} = "
            f"{mark('w_version')} AND {q('lease_owner')} = {mark('w_owner')}"
        )


class Store:
    """Checkpoint store on one database (SQLite, PostgreSQL, DuckDB or MySQL/MariaDB)."""

    def __init__(self, url: str, *, lease_ttl: float = 300.0) -> None:
        self.url = url
        self.engine = engine_for(url)
        self.lease_ttl = lease_ttl
        self._migrated = False
        self._sql = _CheckpointSQL(self.engine)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    # -- schema -------------------------------------------------------------------------

    def schema_version(self, conn: Connection) -> int:
        if not self.engine.dialect.has_table(conn, M.name):
            return 0
        value = conn.execute(select(M.c.value).where(M.c.key == "schema_version")).scalar()
        return int(value) if value else 0

    def migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION in one transaction, once, before any partition."""
        if self._migrated:
            return SCHEMA_VERSION
        with self._migration_lock(), self.writing() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7305)"))  # one migrator at a time
            version = self.schema_version(conn)
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"state database schema version {version} is newer than this pagesync "
                    f"({SCHEMA_VERSION}); upgrade pagesync"
                )
            for step in MIGRATIONS[version:]:
                step(conn)
                crashpoints.reached("migrate")
            if version < SCHEMA_VERSION:
                values = {"key": "schema_version", "value": str(SCHEMA_VERSION)}
                if version == 0:
                    conn.execute(insert(M).values(values))
                else:
                    conn.execute(update(M).where(M.c.key == "schema_version").values(values))
        self._migrated = True
        return SCHEMA_VERSION

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """MySQL/MariaDB: one migrator at a time, through a named lock held on a connection
        of its own until the migration has committed. DDL commits there as it runs, so a
        migration interrupted midway is redone from its start: each step must be safe to
        find partly done (create_all checks for each table first)."""
        if not dialects.is_mysql(self.engine.dialect.name):
            yield
            return
        with self.engine.connect() as lock:
            if lock.exec_driver_sql("SELECT GET_LOCK('pagesync_migrate', 120)").scalar() != 1:
                raise StateError(f"another process has been migrating {self.url} for 2 minutes")
            try:
                yield
            finally:
                lock.exec_driver_sql("SELECT RELEASE_LOCK('pagesync_migrate')")

    # -- reading --------------------------------------------------------------------------

    def partitions(
        self, stream: str | None = None, scope: str | None = "", keys: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rows as dicts with `state` parsed, ordered by stream and partition; with `keys`,
        those partitions' only (a poll of the few in flight among thousands)."""
        q = select(P)
        if stream is not None:
            q = q.where(P.c.stream == stream)
        if scope is not None:
            q = q.where(P.c.scope == scope)
        if keys is not None:
            q = q.where(P.c.partition.in_(keys))
        with self.reading() as conn:
            rows = conn.execute(q.order_by(P.c.stream, P.c.scope, P.c.partition)).mappings().all()
        return [{**row, "state": loads(row["state"]) or {}} for row in rows]

    def history(self, stream: str, scope: str | None = None) -> list[dict[str, Any]]:
        q = select(L).where(L.c.stream == stream)
        if scope is not None:
            q = q.where(L.c.scope == scope)
        with self.reading() as conn:
            rows = conn.execute(q.order_by(L.c.id)).mappings().all()
        out = []
        for row in rows:
            d = dict(row)
            d["cursor_before"], d["cursor_after"] = (
                loads(d["cursor_before"]),
                loads(d["cursor_after"]),
            )
            out.append(d)
        return out

    def last_flow_runs(self, stream: str | None = None) -> dict[tuple[str, str, str], str]:
        """Per (stream, scope, partition): the flow run that committed its latest page."""
        latest = (
            select(func.max(L.c.id))
            .where(L.c.flow_run_id.is_not(None))
            .group_by(L.c.stream, L.c.scope, L.c.partition)
        )
        if stream is not None:
            latest = latest.where(L.c.stream == stream)
        q = select(L.c.stream, L.c.scope, L.c.partition, L.c.flow_run_id).where(L.c.id.in_(latest))
        with self.reading() as conn:
            rows = conn.execute(q).all()
        return {(r.stream, r.scope, r.partition): r.flow_run_id for r in rows}

    def high_water_mark(self, stream: str) -> Any:
        """The largest cursor over the stream's completed partitions (backfills included)."""
        values = [
            p["state"]["cursor"]
            for p in self.partitions(stream, scope=None)
            if p["status"] == COMPLETE and p["state"].get("cursor") is not None
        ]
        try:
            return max(values) if values else None
        except TypeError:  # cursor types differ across partitions: compare as text
            return max(values, key=str)

    # -- writing --------------------------------------------------------------------------

    def ensure(self, stream: str, scope: str, keys: list[str]) -> None:
        """Create pending rows for partitions seen for the first time."""
        with self.writing() as conn:
            have = set(
                conn.execute(
                    select(P.c.partition).where(P.c.stream == stream, P.c.scope == scope)
                ).scalars()
            )
            missing = [k for k in dict.fromkeys(keys) if k not in have]
            if missing:
                now = utcnow()
                conn.execute(
                    insert(P),
                    [{"stream": stream, "scope": scope, "partition": k, "status": PENDING,
                      "state": "{}", "version": 0, "pages": 0, "records": 0, "updated_at": now}
                     for k in missing],
                )  # fmt: skip

    def try_acquire(self, stream: str, scope: str, partition: str, owner: str) -> Lease | None:
        """Take the partition's lease if it is free; None while another live runner holds it."""
        key = and_(P.c.stream == stream, P.c.scope == scope, P.c.partition == partition)
        with self.writing() as conn:
            row = conn.execute(select(P).where(key)).mappings().one()
            now = time.time()
            if not lease_is_free(row["lease_owner"], row["lease_expires"], owner, now):
                return None
            version = row["version"] + 1
            done = conn.execute(
                update(P)
                .where(key, P.c.version == row["version"])
                .values(lease_owner=owner, lease_expires=now + self.lease_ttl, version=version,
                        updated_at=utcnow())
            ).rowcount  # fmt: skip
            if done != 1:
                return None
        return Lease(
            stream=stream, scope=scope, partition=partition, owner=owner, version=version,
            status=row["status"], state=loads(row["state"]) or {}, pages=row["pages"],
            records=row["records"], ttl=self.lease_ttl,
        )  # fmt: skip

    def acquire(
        self, stream: str, scope: str, partition: str, owner: str, *, poll: float = 0.5,
        on_wait: Callable[[str], None] | None = None,
    ) -> Lease:  # fmt: skip
        """Take the lease, waiting while a live runner holds it (it renews on every commit)."""
        told = False
        while True:
            lease = self.try_acquire(stream, scope, partition, owner)
            if lease is not None:
                return lease
            if on_wait is not None and not told:
                on_wait(partition)
                told = True
            time.sleep(poll)

    def renew(self, lease: Lease) -> bool:
        """Push the lease's expiry one TTL ahead; False once it is no longer ours.

        A compare on the owner alone, leaving the version alone, so a renewal never fails a
        page's checkpoint in flight: a takeover or a release changes the owner (host, pid and
        flow run), and that is all a renewal has to tell apart.
        """
        key = and_(
            P.c.stream == lease.stream, P.c.scope == lease.scope, P.c.partition == lease.partition
        )
        with self.writing() as conn:
            return (
                conn.execute(
                    update(P)
                    .where(key, P.c.lease_owner == lease.owner)
                    .values(lease_expires=time.time() + lease.ttl)
                ).rowcount
                == 1
            )

    def lock_stream(self, stream: str, owner: str) -> tuple[StreamLock | None, str]:
        """Take the stream's lock for `owner`: (the lock, owner), or (None, its live holder).

        A lock whose holder is gone (expired, or a dead process on this host, as for a
        partition's lease) is taken over; two runs taking it at once get it once: SQLite
        and DuckDB writers queue, elsewhere the insert's key or the update's compare on the
        value read decides.
        """
        lock = StreamLock(stream, owner, self.lease_ttl)
        try:
            with self.writing() as conn:
                now = time.time()
                old = conn.execute(select(M.c.value).where(M.c.key == lock.key)).scalar()
                if old is None:
                    conn.execute(insert(M).values(key=lock.key, value=lock.value(now)))
                    return lock, owner
                holder, expires = _lock_holder(old)
                if not lease_is_free(holder, expires, owner, now):
                    return None, holder
                taken = conn.execute(
                    update(M).where(M.c.key == lock.key, M.c.value == old)
                    .values(value=lock.value(now))
                ).rowcount  # fmt: skip
        except IntegrityError:  # another run inserted it first
            taken = 0
        if taken == 1:
            return lock, owner
        return None, self.stream_locks(stream).get(stream, ("another run", 0.0))[0]

    def stream_locks(self, stream: str | None = None) -> dict[str, tuple[str, float]]:
        """The streams held as a whole (a replace stream's refresh): stream -> (holder,
        expiry), whether or not the holder still lives."""
        prefix = StreamLock.PREFIX
        where = (M.c.key == f"{prefix}{stream}") if stream else M.c.key.startswith(prefix)
        with self.reading() as conn:
            rows = conn.execute(select(M.c.key, M.c.value).where(where)).all()
        return {key.removeprefix(prefix): _lock_holder(value) for key, value in rows}

    def renew_lock(self, lock: StreamLock) -> bool:
        """Push the lock's expiry one TTL ahead; False once another run took it over."""
        with self.writing() as conn:
            return conn.execute(
                update(M).where(*self._held_by(lock)).values(value=lock.value(time.time()))
            ).rowcount == 1  # fmt: skip

    def unlock_stream(self, lock: StreamLock) -> None:
        """Release the lock, if it is still ours."""
        with self.writing() as conn:
            conn.execute(delete(M).where(*self._held_by(lock)))

    @staticmethod
    def _held_by(lock: StreamLock) -> tuple[Any, ...]:
        return M.c.key == lock.key, M.c.value.startswith(f"{lock.owner}\n", autoescape=True)

    def write(
        self,
        conn: Connection,
        lease: Lease,
        *,
        patch: dict[str, Any],
        status: str | None = None,
        error: str | None = None,
        release: bool = False,
    ) -> None:
        """Commit a checkpoint inside the caller's transaction (from `writing()`): page log
        rows, then a CAS. Raises LeaseLost (the caller rolls back, records included) when
        the version moved."""
        sql = self._sql
        now = sql.stamp(utcnow())
        if lease.log:
            rows = [{**dict.fromkeys(sql.LOG), **e, "committed_at": now} for e in lease.log]
            run_on_driver(conn, sql.log, rows, many=True)
        new_state = mergepatch.apply(lease.state, patch)
        pages = lease.pages + len(lease.log)
        records = lease.records + sum(entry["records"] for entry in lease.log)
        done = run_on_driver(conn, sql.cas, {
            "state": dumps(new_state), "version": lease.version + 1, "pages": pages,
            "records": records, "updated_at": now,
            "lease_expires": None if release else time.time() + lease.ttl,
            "release": int(release), "status": status,
            "set_error": int(error is not None or status == COMPLETE), "error": error,
            "w_stream": lease.stream, "w_scope": lease.scope, "w_partition": lease.partition,
            "w_version": lease.version, "w_owner": lease.owner,
        })  # fmt: skip
        if done != 1:
            raise LeaseLost(
                f"partition {lease.partition} of stream {lease.stream} was taken over by another "
                "run; this run's uncommitted pages were rolled back"
            )

        def moved() -> None:  # our copy moves only when the transaction has committed
            lease.version += 1
            lease.state, lease.pages, lease.records = new_state, pages, records
            if status is not None:
                lease.status = status
            lease.log = []

        conn.info["pagesync_after_commit"].append(moved)

    def commit(self, lease: Lease, **kw: Any) -> None:
        """write() in a transaction of its own."""
        with self.writing() as conn:
            self.write(conn, lease, **kw)

    def reset(self, stream: str, scope: str | None = None) -> int:
        """Forget a stream's partitions and page log (the destination table stays)."""
        with self.writing() as conn:
            qp, ql = P.delete().where(P.c.stream == stream), L.delete().where(L.c.stream == stream)
            if scope is not None:
                qp, ql = qp.where(P.c.scope == scope), ql.where(L.c.scope == scope)
            n = conn.execute(qp).rowcount
            conn.execute(ql)
        return n

    def count_partitions(self, stream: str) -> int:
        with self.reading() as conn:
            return (
                conn.execute(
                    select(func.count()).select_from(P).where(P.c.stream == stream)
                ).scalar()
                or 0
            )

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A write transaction, queued behind this process's other writers on SQLite.

        What write() changes in our in-memory Lease is applied only once the transaction
        has committed: a rolled-back commit leaves the Lease matching the database.
        """
        with write_lock(self.engine):
            with self.engine.begin() as conn:
                conn.info["pagesync_after_commit"] = after = []
                try:
                    yield conn
                finally:
                    conn.info.pop("pagesync_after_commit", None)
            for apply in after:
                apply()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only connection: on SQLite it never takes the write lock."""
        with self.engine.connect() as conn:
            yield conn.execution_options(readonly=True)
