"""Assertions shared by the end-to-end tests: what the destination and the store hold."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text


def quoted(engine: Engine, sql: str) -> str:
    """`sql` with each {name} an identifier quoted for the engine (MariaDB: backticks;
    `partition` is a reserved word there)."""
    q = engine.dialect.identifier_preparer.quote_identifier
    return sql.format_map(_Quote(q))


class _Quote(dict):
    def __init__(self, q: Callable[[str], str]) -> None:
        super().__init__()
        self.q = q

    def __missing__(self, key: str) -> str:
        return self.q(key)


def rows(db_url: str, table: str) -> list[dict[str, Any]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            sql = f"SELECT * FROM {engine.dialect.identifier_preparer.quote_identifier(table)}"
            return [dict(r) for r in conn.execute(text(sql)).mappings()]
    finally:
        engine.dispose()


def assert_exactly_once(db_url: str, table: str, expected_ids: list[int]) -> None:
    """Every source record once: as many rows as ids, no id missing, none extra."""
    got = [r["id"] for r in rows(db_url, table)]
    assert len(got) == len(set(got)), "duplicate rows"
    missing = sorted(set(expected_ids) - set(got))
    extra = sorted(set(got) - set(expected_ids))
    assert not missing, f"{len(missing)} records lost, e.g. {missing[:5]}"
    assert not extra, f"unexpected records {extra[:5]}"


def partition_rows(db_url: str, stream: str) -> list[dict[str, Any]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            q = text(
                quoted(
                    engine,
                    "SELECT * FROM pagesync_partitions WHERE stream = :s ORDER BY {partition}",
                )
            )
            return [dict(r) for r in conn.execute(q, {"s": stream}).mappings()]
    finally:
        engine.dispose()


def committed_pages(db_url: str, stream: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            try:
                q = text("SELECT COUNT(*) FROM pagesync_pages WHERE stream = :s")
                return conn.execute(q, {"s": stream}).scalar() or 0
            except Exception:  # the store does not exist yet
                return 0
    finally:
        engine.dispose()


def assert_counters_match_log(db_url: str, stream: str) -> None:
    """A partition's pages and records counters equal what its page log says."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            q = text(quoted(engine,
                "SELECT p.{partition}, p.pages, p.records, COUNT(l.id) AS logged, "
                "COALESCE(SUM(l.records), 0) AS logged_records FROM pagesync_partitions p "
                "LEFT JOIN pagesync_pages l ON l.stream = p.stream AND l.scope = p.scope "
                "AND l.{partition} = p.{partition} WHERE p.stream = :s "
                "GROUP BY p.{partition}, p.pages, p.records"
            ))  # fmt: skip
            for r in conn.execute(q, {"s": stream}).mappings():
                assert r["pages"] == r["logged"], dict(r)
                assert r["records"] == r["logged_records"], dict(r)
    finally:
        engine.dispose()


def task_runs_of(c: Any, flow_run_id: Any) -> list[Any]:
    """The task runs the Prefect API has recorded for one flow run (`c`: a sync client)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return c.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200
    )


def wait_for(condition: Callable[[], Any], timeout: float = 120, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy (a state to reach, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def same(x: Any, y: Any) -> bool:
    """Equal, and of the same JSON types all the way down (True is not 1, 1.0 is not 1)."""
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
    return x == y


def write_project_code(folder: Path) -> dict[str, str]:
    """Python code of a project beside its pagesync.yaml: a record model in models.py that
    imports its base from a sibling module (relatively), for `model: models:Item`; every
    demo record passes it. Returns the stream keys that name it."""
    (folder / "base.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n\n\n"
        "class Base(BaseModel):\n    model_config = ConfigDict(extra='allow')\n"
    )
    (folder / "models.py").write_text(
        "from .base import Base\n\n\nclass Item(Base):\n    id: int\n    updated_at: str\n"
    )
    return {"model": "models:Item"}
