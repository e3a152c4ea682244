"""What `pagesync state` and `pagesync history` show: pydantic models, one per row.

The same models serve the tables for people and the `--json` output for scripts, so
the two can never disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .store import Store


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


class PageView(BaseModel):
    partition: str
    scope: str
    page: int
    records: int
    cursor: Any = None
    committed_at: datetime
    flow_run_id: str | None = None
    task_run_id: str | None = None


def partition_views(store: Store, stream: str | None = None) -> list[PartitionView]:
    last_runs = store.last_flow_runs(stream)
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
