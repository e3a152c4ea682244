"""What `pagesync state` and `pagesync history` show: pydantic models, one per row.

The same models serve the tables for people and the `--json` output for scripts, so
the two can never disagree.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from .store import RUNNING, Store, lease_is_free, owner_id


class PartitionView(BaseModel):
    stream: str
    scope: str
    partition: str
    status: str
    cursor: Any = None
    pages: int
    records: int
    rejected: int = 0
    updated_at: datetime
    resumed_from: str | None = None
    error: str | None = None
    #: The flow run that committed the partition's latest page.
    flow_run_id: str | None = None
    #: The runner holding the partition's lease (host:pid:flow run), while it is running.
    holder: str | None = None
    #: A running partition whose holder is gone (its lease expired, or its process on this
    #: host is dead): when it was last known alive. Nothing runs the partition; the next
    #: run takes it over and resumes it.
    holder_dead_since: datetime | None = None
    #: A replace stream's refresh in progress: the runner holding it, while it lives
    #: (another refresh of the stream is refused until it ends).
    refresh_held_by: str | None = None

    @property
    def shown_status(self) -> str:
        """The status for people: `running` only while something runs it."""
        if self.holder_dead_since is None:
            return self.status
        return f"running, holder dead since {self.holder_dead_since:%Y-%m-%d %H:%M:%S}"


class PageView(BaseModel):
    partition: str
    scope: str
    page: int
    records: int
    cursor: Any = None
    committed_at: datetime
    flow_run_id: str | None = None
    task_run_id: str | None = None


class RefreshLockView(BaseModel):
    """A replace stream's refresh lock (`Store.lock_stream`): who holds it, until when."""

    stream: str
    holder: str
    expires_at: datetime
    #: The holder is gone (the lock expired, or its process on this host is dead): the
    #: next run takes the lock over.
    holder_gone: bool


def _gone(owner: str, expires: float, now: float) -> bool:
    """Whether a holder within its expiry is gone: asked as a runner of this host that holds
    nothing, so only a dead process is free (elsewhere the expiry decides)."""
    return lease_is_free(owner, expires, f"{owner_id().partition(':')[0]}:0:-", now)


def holder_dead_since(row: dict[str, Any], now: float | None = None) -> datetime | None:
    """For a running partition whose lease holder is gone, when it was last known alive:
    the lease's expiry if it expired, else (a dead process on this host, as the lease
    rules tell it) its last commit. None while the holder may be alive."""
    if row["status"] != RUNNING:
        return None
    now = time.time() if now is None else now
    owner, expires = row["lease_owner"], row["lease_expires"]
    if owner and expires is not None and expires > now:
        if not _gone(owner, expires, now):
            return None  # alive, or on another host and within its lease
        return _aware(row["updated_at"])
    if expires is not None:
        return datetime.fromtimestamp(expires, UTC)
    return _aware(row["updated_at"])


def _aware(stamp: datetime) -> datetime:
    """Stamps are UTC; SQLite gives them back without their zone."""
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def refresh_locks(store: Store, stream: str | None = None) -> list[RefreshLockView]:
    """The refreshes in progress (or left by a runner that is gone), by stream."""
    now = time.time()
    return [
        RefreshLockView(
            stream=name,
            holder=holder,
            expires_at=datetime.fromtimestamp(expires, UTC),
            holder_gone=_gone(holder, expires, now),
        )
        for name, (holder, expires) in sorted(store.stream_locks(stream).items())
    ]


def partition_views(
    store: Store, stream: str | None = None, locks: list[RefreshLockView] | None = None
) -> list[PartitionView]:
    """Each partition's row; `locks` (`refresh_locks`) fills in who refreshes its stream."""
    last_runs = store.last_flow_runs(stream)
    refreshing = {lock.stream: lock.holder for lock in locks or () if not lock.holder_gone}
    now = time.time()
    return [
        PartitionView(
            stream=row["stream"],
            scope=row["scope"],
            partition=row["partition"],
            status=row["status"],
            cursor=row["state"].get("cursor"),
            pages=row["pages"],
            records=row["records"],
            rejected=row["state"].get("rejected", 0),
            updated_at=row["updated_at"],
            error=row["error"],
            flow_run_id=last_runs.get((row["stream"], row["scope"], row["partition"])),
            holder=row["lease_owner"] if row["status"] == RUNNING else None,
            holder_dead_since=holder_dead_since(row, now),
            refresh_held_by=refreshing.get(row["stream"]),
        )
        for row in store.partitions(stream, scope=None)
    ]


def page_views(store: Store, stream: str) -> list[PageView]:
    return [
        PageView(
            partition=row["partition"],
            scope=row["scope"],
            page=row["page"],
            records=row["records"],
            cursor=row["cursor_after"],
            committed_at=row["committed_at"],
            flow_run_id=row["flow_run_id"],
            task_run_id=row["task_run_id"],
        )
        for row in store.history(stream)
    ]
