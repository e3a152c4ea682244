"""Read one page, write it, commit its checkpoint: the unit a page task calls.

`StreamRun` holds what the partitions of one run share (HTTP client, rate limit, stores);
`PartitionRun` walks one partition page by page. The order of a page is fixed: fetch,
extract, write, commit, and only then may the next page be requested for real. The one
thing done early is the next page's HTTP request, which is put in flight while this page
is written and committed; its response is only used after the commit.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Connection

from . import config as cfg
from . import crashpoints, dialects, mergepatch
from . import records as records_
from .destination import Destination
from .errors import (
    ExtractError,
    LeaseLost,
    PageError,
    PagesyncError,
    PaginationLoop,
    Stopped,
)
from .extract import cursor_values
from .http import Limiter, RateLimiter, SourceClient
from .keeper import KEEPER
from .paginators import PageRequest, Token, base_request
from .partitions import PartitionSpec, plan
from .store import (
    COMPLETE,
    INCOMPLETE,
    RUNNING,
    Lease,
    Store,
    StreamLock,
    dumps,
    engine_for,
    owner_id,
    write_lock,
)
from .streams import user_code
from .views import holder_dead_since

log = logging.getLogger("pagesync")


#: Seconds a stopped run's requests in flight get to finish their pages before they are
#: aborted (SIGTERM and Ctrl-C in the CLI, a cancelled or stopped flow run elsewhere).
ABORT_AFTER = 3.0


class Stop:
    """A request to stop a run at its next page boundary (SIGTERM, Ctrl-C): every
    partition ends after its page in progress, and committed pages stay.

    One belongs to each run (a served deployment or `pagesync.sync()` called twice in one
    process must not inherit an earlier run's stop); whoever handles the signal holds it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        #: The runs this stop reaches (each registers itself while it lives).
        self.runs: set[StreamRun] = set()

    def request(self, reason: str, abort_after: float | None = None) -> None:
        """Stop at the next page boundary; with `abort_after`, requests still in flight that
        many seconds later are aborted (`abort_requests`)."""
        self.reason = reason
        self._event.set()
        if abort_after is not None:
            timer = threading.Timer(abort_after, self.abort_requests)
            timer.daemon = True
            timer.start()

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def said(self) -> str:
        """How a stopped page or run says why: `stopped (SIGTERM)`."""
        return f"stopped ({self.reason or 'stop requested'})"

    def abort_requests(self) -> None:
        """Close the runs' HTTP clients, so requests still in flight fail now instead of at
        their timeout."""
        for run in list(self.runs):
            run.client.close()


@dataclass
class PageResult:
    """What a page task returns to Prefect: small, no records."""

    page: int
    records: int
    cursor: Any
    committed: bool
    done: bool


@dataclass
class PartitionOutcome:
    """How a partition ended in this run; the flow's summary table is made of these."""

    partition: str
    status: str
    pages: int = 0
    records: int = 0
    first_cursor: Any = None
    last_cursor: Any = None
    resumed_from: str | None = None
    error: str | None = None
    skipped: bool = False
    #: Pages and records committed by this run (`pages`/`records` are the partition's totals).
    new_pages: int = 0
    new_records: int = 0
    #: Records the stream's model refused (kept in the `<stream>__rejected` table).
    rejected: int = 0
    #: The partition was left running by a runner that is gone, and this run took it over.
    taken_over: str | None = None


class Observer(Protocol):
    """Told of progress; the CLI's live display and Prefect's artifacts are observers."""

    def page_committed(self, stream: str, progress: PartitionOutcome) -> None: ...

    def partition_done(self, stream: str, outcome: PartitionOutcome) -> None: ...


class StreamRun:
    """One run of one stream: what its partitions share."""

    def __init__(
        self,
        config: cfg.Config,
        stream: str,
        *,
        flow_run_id: str | None = None,
        full_refresh: bool = False,
        scope: str = "",
        observers: list[Observer] | None = None,
        client: SourceClient | None = None,
        stop: Stop | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.name = stream
        self.stream = config.stream(stream)
        self.source = config.sources[self.stream.source]
        self.flow_run_id = flow_run_id
        self.full_refresh = full_refresh
        self.scope = scope
        self.observers = observers or []
        if limiter is None and self.source.rate_limit:
            limiter = RateLimiter(self.source.rate_limit.per_second)
        self.client = client or SourceClient(self.source, limiter=limiter)
        self.reader, self.model = user_code(config, stream)
        self.store = Store(config.state, lease_ttl=self.source.lease_ttl)
        self.same_db = config.destination_url == config.state
        self.destination = Destination(engine_for(config.destination_url))
        self.owner = owner_id(flow_run_id)
        self.fetcher = ThreadPoolExecutor(
            max_workers=self.source.concurrency, thread_name_prefix=f"pagesync-{stream}"
        )
        self.stop = stop or Stop()
        self.stop.runs.add(self)
        #: replace: the refresh this run belongs to (chosen in `prepare`), and where its
        #: records go until `swap` puts them in place.
        self.refresh: str | None = None
        self.replaces = self.stream.write_disposition == "replace"
        self.table = f"{stream}{records_.STAGING}" if self.replaces else stream
        self._keys: list[str] = []
        #: Partitions left running by a runner that is gone: when it was last alive.
        self.orphaned: dict[str, datetime] = {}
        #: What this run holds until `close`: a replace stream's refresh lock.
        self._held = contextlib.ExitStack()

    def prepare(
        self, specs: list[PartitionSpec] | None = None, **plan_kw: Any
    ) -> list[PartitionSpec]:
        """Migrate the store (once, before any partition) and register the partitions."""
        if self.replaces and self.scope:
            raise PagesyncError(
                f"stream {self.name}: write_disposition: replace refreshes the whole table; "
                "a backfill of a range cannot replace it (use merge or append)"
            )
        self.store.migrate()
        if specs is None:
            specs = plan(self.stream, parent_values=self.parent_values, **plan_kw)
        crashpoints.reached("plan")
        self._keys = [s.key for s in specs]
        self.store.ensure(self.name, self.scope, self._keys)
        if self.replaces:
            self._lock_refresh()  # before the rows are read: what a last holder left is there
        rows = {p["partition"]: p for p in self.store.partitions(self.name, self.scope)}
        if self.replaces:
            self.refresh = self._choose_refresh(rows)
        self.orphaned = {
            key: since for key, row in rows.items() if (since := holder_dead_since(row)) is not None
        }
        return specs

    # -- replace ------------------------------------------------------------------------

    def _pairs(self) -> list[tuple[str, str]]:
        """(staging, live) for the stream's table and each of its child tables."""
        return records_.table_pairs(self.name, self.stream.nested.child_tables)

    def _lock_refresh(self) -> None:
        """Hold the stream's refresh lock until the run closes: from the look at who else
        refreshes it (`_choose_refresh`) until this run's partitions are leased, and
        between them, no other run may start a refresh and drop the staging table."""
        lock, holder = self.store.lock_stream(self.name, self.owner)
        if lock is None:
            raise PagesyncError(_one_refresh(self.name, f"held by {holder}"))
        self._held.callback(_unlock, self.store, lock)
        self._held.enter_context(KEEPER.holding(self.store, lock))

    def _choose_refresh(self, rows: dict[str, dict[str, Any]]) -> str:
        """The refresh this run continues, or a new one.

        A partition's state names the refresh its walk belongs to. A refresh is unfinished
        while one of its partitions is not complete, or while its staging table waits to
        be swapped in (all complete, killed before the swap): this run continues it, so a
        crash costs no page. Otherwise the last refresh was swapped in, and a new one
        starts with an empty staging table.

        One refresh at a time: this run holds the stream's refresh lock (`_lock_refresh`),
        and a live runner holding a partition of the stream without it (a fan-out child of
        a run that died) stops this run here too, before it could drop the staging table
        that runner writes.
        """
        mine = [rows[k] for k in self._keys if k in rows]
        held = [p for p in mine if p["status"] == RUNNING and holder_dead_since(p) is None]
        if held:  # a runner the lock does not know: a fan-out child left by a dead run
            raise PagesyncError(_one_refresh(
                self.name, f"partition {held[0]['partition']} is held by {held[0]['lease_owner']}"
            ))  # fmt: skip
        if not self.full_refresh:
            open_ = [p["state"]["refresh"] for p in mine
                     if p["state"].get("refresh") and p["status"] != COMPLETE]  # fmt: skip
            if open_:
                return str(open_[0])
            ids = {p["state"].get("refresh") for p in mine}
            if len(ids) == 1 and None not in ids and self._staged():
                return str(ids.pop())
        self.destination.drop([staging for staging, _ in self._pairs()])
        return uuid.uuid4().hex[:12]

    def _staged(self) -> bool:
        with self.destination.engine.connect() as conn:
            return bool(dialects.table_columns(conn, self.table))

    def settled(self, spec: PartitionSpec, status: str, state: dict[str, Any]) -> bool:
        """Whether this run has nothing to walk in the partition: complete, and neither
        reopened (`reopens`) nor, for replace, of an earlier refresh."""
        if status != COMPLETE or self.full_refresh:
            return False
        if self.replaces:
            return state.get("refresh") == self.refresh
        return not reopens(self.stream, spec, state)

    def swap(self) -> bool:
        """replace: when every partition of the refresh is complete, put its staging tables
        in place of the live ones (one transaction; see `Destination.swap`). The flow calls
        this once its partitions have ended; False when there is nothing to swap yet."""
        if not self.replaces or self.refresh is None:
            return False
        rows = {p["partition"]: p for p in self.store.partitions(self.name, self.scope)}
        for key in self._keys:
            row = rows.get(key)
            if (
                row is None
                or row["status"] != COMPLETE
                or row["state"].get("refresh") != self.refresh
            ):
                return False
        crashpoints.reached("before_swap")
        swapped = self.destination.swap(self._pairs())
        if swapped:
            log.info("stream %s: refresh %s swapped in", self.name, self.refresh)
        else:
            log.warning("stream %s: refresh %s found no records; the table is kept as it was",
                        self.name, self.refresh)  # fmt: skip
        return swapped

    def parent_values(self, p: cfg.ParentPartitions) -> list[Any]:
        """The parent stream's key values, read from its destination table."""
        dest = Destination(engine_for(self.config.destination_url))
        return dest.column_values(p.stream, p.key)

    def partition(self, spec: PartitionSpec) -> PartitionRun:
        return PartitionRun(self, spec)

    def close(self) -> None:
        self.stop.runs.discard(self)
        self.fetcher.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self._held.close()


def _one_refresh(stream: str, holder: str) -> str:
    return (
        f"stream {stream}: another run is refreshing it ({holder}); a replace stream runs "
        "one refresh at a time: run it again when that run has ended"
    )


def _unlock(store: Store, lock: StreamLock) -> None:
    try:
        store.unlock_stream(lock)
    except Exception:  # the run's outcome stands; the lock expires after its TTL
        log.warning("stream %s: releasing its refresh lock failed; it expires in %ss",
                    lock.stream, lock.ttl, exc_info=True)  # fmt: skip


def reopens(stream: cfg.Stream, spec: PartitionSpec, state: dict[str, Any]) -> bool:
    """Whether a complete partition is walked again (short of a full refresh): an
    incremental one continues from its high-water mark, a datetime window that grew reopens;
    any other stays complete and is skipped."""
    incremental = stream.cursor is not None and stream.cursor.param and spec.window_end is None
    grew = spec.window_end is not None and spec.window_end > state.get("window_end", "")
    return bool(incremental or grew)


class PartitionRun:
    """Walks one partition: resume point at `open()`, then one `step()` per page."""

    def __init__(self, run: StreamRun, spec: PartitionSpec) -> None:
        self.run = run
        self.spec = spec
        self.key = spec.key
        self.stream = run.stream
        self.cursor_field = run.stream.cursor.field if run.stream.cursor else None
        #: Rows inserted with a load id (see `_generation`): append streams, and replace
        #: streams without a primary key.
        self.appends = run.stream.write_disposition == "append" or (
            run.replaces and not run.stream.primary_key
        )
        self.lease: Lease | None = None
        self.outcome = PartitionOutcome(spec.key, RUNNING)
        self.warned = False
        self.last: PageResult | None = None
        #: Same-database mode: pages written since the last checkpoint, committed with it.
        self._pending: list[tuple[list[dict[str, Any]], list[Rejected], int]] = []
        self._ahead: tuple[PageRequest, Future[httpx.Response]] | None = None
        self._since_commit = (0, 0, time.monotonic())  # pages, records, when
        self._counts_at_open = (0, 0)

    # -- resume point -------------------------------------------------------------------

    def open(self, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lease and decide where to start; False when there is nothing to do."""
        run = self.run
        lease = run.store.acquire(run.name, run.scope, self.key, run.owner, on_wait=on_wait)
        self.lease = lease
        self._counts_at_open = (lease.pages, lease.records)
        st = lease.state
        cursor_spec = self.stream.cursor
        config_start = cursor_spec.start if cursor_spec else None
        resumed: str | None = None
        if run.full_refresh or st.get("refresh") != run.refresh:  # replace: a new refresh
            new = self._generation(config_start)
            if lease.status != COMPLETE:  # an unfinished walk: this one replaces it
                self._forget_rewritten(st, everything=True)
        elif lease.status == COMPLETE:
            if run.settled(self.spec, lease.status, st):
                self._release_untouched()
                self.outcome = self._outcome(COMPLETE, skipped=True)
                return False
            # Next generation: from the partition's own high-water mark.
            new = self._generation(st.get("cursor", config_start))
            resumed = f"cursor {st['cursor']!r}" if st.get("cursor") is not None else None
        elif st.get("page"):
            if self._cursor_resumable(st):
                new = {**st, "next": None, "resume": st["cursor"]}
                resumed = f"cursor {st['cursor']!r}"
                self._forget_rewritten(st, cursor=True)
            elif run.reader.stable_tokens and "next" in st:
                new = dict(st)
                resumed = f"page {st['page'] + 1} (stored token)"
                self._forget_rewritten(st)
            else:
                log.warning(
                    "stream %s partition %s: no safe resume point (records not in cursor order "
                    "and paginator tokens not stable); restarting the partition",
                    run.name, self.key,
                )  # fmt: skip
                new = self._generation(st.get("start", config_start))
                resumed = "restart"
                self._forget_rewritten(st, everything=True)
        else:
            new = self._generation(st.get("start", config_start))
            self._forget_rewritten(st, everything=True)  # a first walk that never committed
        if self.spec.window_end is not None:
            new["window_end"] = self.spec.window_end
        new.pop("done", None)
        new = {k: v for k, v in new.items() if v is not None}
        patch = mergepatch.diff(st, new)
        run.store.commit(lease, patch=patch, status=RUNNING)
        dead = run.orphaned.get(self.key)
        self.outcome = PartitionOutcome(
            self.key, RUNNING, first_cursor=new.get("first_cursor"), resumed_from=resumed,
            taken_over=f"holder dead since {dead:%Y-%m-%d %H:%M:%S}" if dead else None,
        )  # fmt: skip
        self._base = self._base_request(new)
        self._position = new
        return True

    def _cursor_resumable(self, st: dict[str, Any]) -> bool:
        c = self.stream.cursor
        if self.appends and c is not None and "." in c.field:
            return False  # its rows at the resume value cannot be found to take back
        return bool(c and c.param and st.get("sorted") and st.get("cursor") is not None)

    def _generation(self, start: Any) -> dict[str, Any]:
        """A fresh walk of the partition, filtering from `start` when there is one; an
        append stream's walk gets a load id its rows carry."""
        walk = {"start": start, "resume": start, "page": 0, "sorted": True}
        if self.appends:
            walk["load"] = uuid.uuid4().hex
        if self.run.refresh is not None:
            walk["refresh"] = self.run.refresh
        return walk

    def _forget_rewritten(
        self, st: dict[str, Any], *, cursor: bool = False, everything: bool = False
    ) -> None:
        """An append stream resuming or restarting an unfinished walk: take back the rows
        it will write again (see `Destination.forget_load`), so each record lands once."""
        load = st.get("load")
        if not self.appends or load is None:
            return
        from_page = 1 if everything else int(st.get("page", 0)) + 1
        at = (self.cursor_field, st["cursor"]) if cursor and self.cursor_field else None
        dest = self.run.destination
        with write_lock(dest.engine), dest.engine.begin() as conn:
            n = dest.forget_load(conn, self.run.table, self.key, load, from_page, at)
        if n:
            log.info("stream %s partition %s: %d appended rows to write again taken back",
                     self.run.name, self.key, n)  # fmt: skip

    def _base_request(self, position: dict[str, Any]) -> PageRequest:
        return base_request(self.stream, self.spec.path, self.spec.params, position.get("resume"))

    def _release_untouched(self) -> None:
        assert self.lease is not None
        self.run.store.commit(self.lease, patch={}, release=True)

    @property
    def next_page(self) -> int:
        return int(self._position.get("page", 0)) + 1

    # -- one page -----------------------------------------------------------------------

    def stopped_before(self) -> Stopped:
        """What a stop requested before the next page says."""
        return Stopped(
            f"{self.run.stop.said} before page {self.next_page}; committed pages are kept"
        )

    def step(self, page: int, task_run_id: str | None = None) -> PageResult:
        """Bring the partition up to `page` committed-or-written; idempotent for retries.

        After a failure, pages written since the last checkpoint were rolled back, so a
        retried step redoes them too.
        """
        while self.next_page <= page:
            if self.run.stop.is_set():
                raise self.stopped_before()
            failing = self.next_page  # before the rollback moves it back to the checkpoint
            try:
                self.last = self._one_page(task_run_id)
            except BaseException as exc:
                self._rollback()
                if self.run.stop.is_set() and not isinstance(exc, Stopped):
                    # a request aborted by the stop, or anything else while the run ends
                    raise Stopped(
                        f"{self.run.stop.said} during page {failing}, which was not committed; "
                        "committed pages are kept"
                    ) from exc
                if isinstance(exc, PageError):
                    exc.located(
                        stream=self.run.name, partition=self.key, page=failing,
                        committed=self.lease.state.get("cursor") if self.lease else None,
                    )  # fmt: skip
                raise
            if self.last.done:
                break
        assert self.last is not None
        return self.last

    @property
    def done(self) -> bool:
        return self.last is not None and self.last.done

    def _one_page(self, task_run_id: str | None) -> PageResult:
        run, pos = self.run, self._position
        token: Token = pos.get("next", run.reader.first())
        req = run.reader.request(self._base, token)
        crashpoints.reached("before_fetch")
        response = self._fetch(req)
        crashpoints.reached("after_fetch")
        records, nxt = self._parse(response, token)
        page = self.next_page
        if run.reader.max_pages is not None and page >= run.reader.max_pages:
            nxt = None  # paginator.max_pages: the partition ends here
        if nxt is not None:
            seen = nxt if isinstance(nxt, str | int) else dumps(nxt)
            if nxt == token or seen in pos.setdefault("_seen", set()):
                raise PaginationLoop(
                    f"the API sent page {page}'s next-page pointer again "
                    f"({run.client.redact(str(nxt))}): a pagination loop; stopped",
                    url=run.client.redact(response.url),
                )
            pos["_seen"].add(seen)
            self._prefetch(run.reader.request(self._base, nxt))
        cursor_before = pos.get("cursor")
        if self.cursor_field and records:
            self._track_cursor(records)
        rejected: list[tuple[dict[str, Any], str]] = []
        if run.model is not None:
            records, rejected = validate(records, run.model)
            if rejected:
                pos["rejected"] = pos.get("rejected", 0) + len(rejected)
        written = self._write(records, rejected, page)
        crashpoints.reached("after_write")
        entry = {
            "stream": run.name, "scope": run.scope, "partition": self.key, "page": page,
            "records": written, "cursor_before": _j(cursor_before), "cursor_after": _j(pos.get("cursor")),
            "flow_run_id": run.flow_run_id, "task_run_id": task_run_id,
        }  # fmt: skip
        assert self.lease is not None
        self.lease.log.append(entry)
        pos["page"] = page
        if nxt is None:
            pos.pop("next", None)
        else:
            pos["next"] = nxt
        done = nxt is None
        pages, recs, since = self._since_commit
        self._since_commit = (pages + 1, recs + written, since)
        committed = done or self._due()
        if committed:
            self._commit(done)
        return PageResult(page, written, pos.get("cursor"), committed, done)

    def _parse(self, response: httpx.Response, token: Token) -> tuple[list[dict[str, Any]], Token]:
        run = self.run
        try:
            parsed = run.reader.parse(response, token)
        except PageError as e:  # the reader knows what is wrong, not where
            e.url = e.url or run.client.redact(response.url)
            raise
        except PagesyncError:
            raise
        except Exception as e:  # a Python stream's own parse failed: say whose
            raise ExtractError(  # its message may quote the body, credentials and all
                run.client.hide(
                    f"{type(run.reader).__name__}.parse failed: {type(e).__name__}: {e}"
                ),
                url=run.client.redact(response.url),
            ) from None
        return parsed.records, run.client.scrub(parsed.next)

    def _track_cursor(self, records: list[dict[str, Any]]) -> None:
        pos, field_ = self._position, self.cursor_field
        values = cursor_values(records, field_)
        if not values:
            return
        prev = pos.get("cursor")
        try:
            top = max(values)
            ordered = all(map(operator.le, values, islice(values, 1, None))) and (
                prev is None or values[0] >= prev
            )
            pos["cursor"] = top if prev is None else max(prev, top)
        except TypeError:  # mixed types: no order to rely on
            ordered = False
            pos["cursor"] = values[-1]
        pos.setdefault("first_cursor", values[0])
        if pos.get("sorted") and not ordered:
            pos["sorted"] = False
            if not self.run.reader.stable_tokens and not self.warned:
                self.warned = True
                log.warning(
                    "stream %s partition %s: records are not in ascending %s order and the "
                    "paginator's tokens are not declared stable; a crash will restart this "
                    "partition (set stable_tokens: true on the paginator if its tokens survive)",
                    self.run.name, self.key, field_,
                )  # fmt: skip

    def _due(self) -> bool:
        policy = self.stream.checkpoint
        pages, records, since = self._since_commit
        return bool(
            (policy.every_pages and pages >= policy.every_pages)
            or (policy.every_records and records >= policy.every_records)
            or (policy.every_seconds and time.monotonic() - since >= policy.every_seconds)
            or not (policy.every_pages or policy.every_records or policy.every_seconds)
        )

    # -- I/O ----------------------------------------------------------------------------

    def _fetch(self, req: PageRequest) -> httpx.Response:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == req:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()
        return self.run.client.get(req)

    def _prefetch(self, req: PageRequest) -> None:
        self._ahead = (req, self.run.fetcher.submit(self.run.client.get, req))

    def _write(self, records: list[dict[str, Any]], rejected: list[Rejected], page: int) -> int:
        """Same database: keep the page until its checkpoint, so one short transaction holds
        records and state. Otherwise: upsert now (at-least-once), the checkpoint follows."""
        run = self.run
        if run.same_db:
            if records or rejected:
                self._pending.append((records, rejected, page))
            return len(records)
        with write_lock(run.destination.engine), run.destination.engine.begin() as conn:
            return self._upsert(conn, records, rejected, page)

    def _upsert(
        self, conn: Connection, records: list[dict[str, Any]], rejected: list[Rejected], page: int
    ) -> int:
        run = self.run
        if rejected:
            run.destination.write_rejected(conn, run.name, rejected, partition=self.key, page=page)
        return run.destination.write(
            conn, run.table, self.stream.primary_key, records, partition=self.key, page=page,
            nested=self.stream.nested, load=self._position.get("load") if self.appends else None,
        )  # fmt: skip

    def _commit(self, done: bool) -> None:
        """The checkpoint: records (same database) and state in one transaction."""
        run, lease, pos = self.run, self.lease, self._position
        assert lease is not None
        new = {k: v for k, v in pos.items() if not k.startswith("_") and v is not None}
        if done:
            new["done"] = True
        patch = mergepatch.diff(lease.state, new)
        status = COMPLETE if done else None
        with run.store.writing() as conn:
            if run.same_db:
                run.destination.prepare(
                    conn, run.name, self.stream.primary_key, self._pending,
                    self.stream.nested, append=self.appends, table=run.table,
                )  # fmt: skip
                for records, rejected, page in self._pending:
                    self._upsert(conn, records, rejected, page)
            run.store.write(conn, lease, patch=patch, status=status, release=done)
            crashpoints.reached("in_commit")
        crashpoints.reached("after_commit")
        self._pending = []
        self._since_commit = (0, 0, time.monotonic())
        if self.run.observers:
            self._tell("page_committed", self.run.name, self._outcome(RUNNING))

    def _rollback(self) -> None:
        """Forget what was not committed: the database's copy and ours."""
        self._pending = []
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self.lease is not None:
            self.lease.log = []
            st = self.lease.state
            self._position = {**st, "_seen": set()}
            self._since_commit = (0, 0, time.monotonic())

    # -- end ----------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> PartitionOutcome:
        """Mark the partition incomplete with its error; committed pages stay."""
        self._rollback()
        message = str(exc) or type(exc).__name__
        lease = self.lease
        if lease is not None and not isinstance(exc, LeaseLost):
            with contextlib.suppress(LeaseLost):
                self.run.store.commit(
                    lease, patch={}, status=INCOMPLETE, error=message, release=True
                )
        self.outcome = self._outcome(INCOMPLETE, error=message)
        self._notify()
        return self.outcome

    def finish(self) -> PartitionOutcome:
        self.outcome = self._outcome(COMPLETE)
        self._notify()
        return self.outcome

    def _new_counts(self) -> tuple[int, int]:
        lease = self.lease
        if lease is None:
            return 0, 0
        return lease.pages - self._counts_at_open[0], lease.records - self._counts_at_open[1]

    def _outcome(self, status: str, **kw: Any) -> PartitionOutcome:
        lease = self.lease
        st = lease.state if lease else {}
        new_pages, new_records = self._new_counts()
        return PartitionOutcome(
            self.key, status,
            pages=lease.pages if lease else 0, records=lease.records if lease else 0,
            first_cursor=st.get("first_cursor"), last_cursor=st.get("cursor"),
            resumed_from=self.outcome.resumed_from, new_pages=new_pages, new_records=new_records,
            taken_over=self.outcome.taken_over,
            rejected=st.get("rejected", 0),
            **kw,
        )  # fmt: skip

    def _notify(self) -> None:
        self._tell("partition_done", self.run.name, self.outcome)

    def _tell(self, event: str, *args: Any) -> None:
        """Observers are for display: one that fails is logged, never fails a page."""
        for obs in self.run.observers:
            try:
                getattr(obs, event)(*args)
            except Exception:
                log.exception("progress observer %r failed on %s", obs, event)


Rejected = tuple[dict[str, Any], str]


def validate(
    records: list[dict[str, Any]], model: type[BaseModel]
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Records that pass the model (as it dumps them), and the others with their error."""
    good: list[dict[str, Any]] = []
    bad: list[Rejected] = []
    for record in records:
        try:
            good.append(model.model_validate(record).model_dump(mode="json", by_alias=True))
        except ValidationError as e:
            bad.append(
                (
                    record,
                    "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()),
                )
            )
    return good, bad


def _j(value: Any) -> str | None:
    return None if value is None else dumps(value)


def run_partition(
    part: PartitionRun,
    page_runner: Callable[[PartitionRun, int], PageResult],
    started: Callable[[PartitionRun, bool], None] | None = None,
) -> PartitionOutcome:
    """Drive a partition to its end with `page_runner` (a Prefect task, or a plain call);
    `started(part, opened)` is told where it starts (or that it is skipped) before any page."""
    opened = part.open()
    if started is not None:
        started(part, opened)
    if not opened:
        part._notify()
        return part.outcome
    assert part.lease is not None
    try:
        with KEEPER.holding(part.run.store, part.lease):
            while not part.done:
                if part.run.stop.is_set():  # before the next page's task run is made
                    raise part.stopped_before()
                page_runner(part, part.next_page)
    except BaseException as exc:
        part.fail(exc)
        raise
    return part.finish()
