"""End to end, in process: every paginator against the real demo API, through a real
Prefect server, into SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, database_url, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    partition_rows,
    rows,
    task_runs_of,
    wait_for,
)

from pagesync.core.config import load_config
from pagesync.core.errors import ConfigError
from pagesync.core.store import Store
from pagesync.demo.api import DemoAPI


def sync(path: Path, stream: str, **kw: object) -> dict:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), **kw)


@pytest.mark.parametrize("kind", sorted(STREAMS))
@pytest.mark.floor
def test_every_paginator_syncs_every_record_once(tmp_path: Path, api: DemoAPI, kind: str) -> None:
    path = write_config(tmp_path, api.url, {kind: STREAMS[kind]})
    summary = sync(path, kind)
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    assert_exactly_once(db, kind, [i["id"] for i in api.items])
    pages = len([r for r in api.requests if not r["path"].startswith("/_control")])
    assert summary["records"] == len(api.items)
    assert summary["pages"] == pages  # one committed page per request, no refetch
    [part] = partition_rows(db, kind)
    assert part["status"] == "complete" and part["pages"] == pages
    assert_counters_match_log(db, kind)


def test_rows_carry_typed_fields_nested_json_and_metadata(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    sync(path, "items")
    by_id = {r["id"]: r for r in rows(f"sqlite:///{tmp_path / 'pagesync.db'}", "items")}
    source = api.items[7]
    row = by_id[source["id"]]
    assert row["name"] == source["name"] and row["price"] == source["price"]
    import json

    assert json.loads(row["attrs"]) == source["attrs"] and json.loads(row["tags"]) == source["tags"]
    assert row["_pagesync_partition"] == "all" and row["_pagesync_page"] >= 1
    assert row["_pagesync_synced_at"]


def test_incremental_run_starts_at_high_water_mark_and_upserts(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    sync(path, "items")
    hwm = max(i["updated_at"] for i in api.items)
    api.clear_requests()
    added = api.add_items(40)
    api.touch_items([1, 2])  # updated records come back with a later cursor
    sync(path, "items")
    first = api.requests[0]["query"]
    assert first["updated_at__gte"] == hwm, "second run must filter from the high-water mark"
    assert len(api.requests) == 1  # 40 new + 2 touched + the overlap fit in one page
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    assert_exactly_once(db, "items", [i["id"] for i in api.items])
    touched = {r["id"]: r for r in rows(db, "items")}
    assert touched[1]["updated_at"] == next(i for i in api.items if i["id"] == 1)["updated_at"]
    assert {a["id"] for a in added} <= set(touched)
    store = Store(load_config(path).state)
    assert store.high_water_mark("items") == max(i["updated_at"] for i in api.items)


def test_full_refresh_ignores_high_water_mark(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    sync(path, "items")
    api.clear_requests()
    sync(path, "items", full_refresh=True)
    assert "updated_at__gte" not in api.requests[0]["query"]
    assert len(api.requests) == -(-len(api.items) // 150)


def test_postgres_destination_and_state(tmp_path: Path, api: DemoAPI, pg_url: str) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]}, state=pg_url)
    sync(path, "items")
    assert_exactly_once(pg_url, "items", [i["id"] for i in api.items])
    assert_counters_match_log(pg_url, "items")


def test_separate_destination_is_at_least_once_without_duplicates(
    tmp_path: Path, api: DemoAPI, pg_url: str
) -> None:
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    path = write_config(
        tmp_path, api.url, {"items": STREAMS["cursor"]}, state=pg_url, destination=dest
    )
    sync(path, "items")
    sync(path, "items", full_refresh=True)  # everything again: upserted, not duplicated
    assert_exactly_once(dest, "items", [i["id"] for i in api.items])


def test_a_stop_aborts_the_request_in_flight_and_says_so(tmp_path: Path, api: DemoAPI) -> None:
    """A stop requested while a page's request is in flight (SIGTERM, Ctrl-C, a cancelled
    flow run): the request is aborted after `abort_after`, and the page fails as stopped
    during that page, not with the closed client's error; the next run syncs it all."""
    import threading

    from pagesync.core.engine import Stop
    from pagesync.flows import RunHooks, flow_for, run_hooks

    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    api.clear_requests()
    api.add_fault(kind="slow", delay=8.0, times=1)  # the first page's request
    stop = Stop()
    ended: list[Any] = []

    def run() -> None:
        with run_hooks(RunHooks(stop=stop)):
            ended.append(flow_for("items")(stream="items", config=str(path), return_state=True))

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: api.requests, 60, what="the first page's request")
    stop.request("test", abort_after=0.2)
    thread.join(60)
    [state] = ended
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False).exceptions[0])
    assert "stopped (test) during page 1, which was not committed" in message, message

    assert sync(path, "items")["complete"] == 1
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    assert_exactly_once(db, "items", [i["id"] for i in api.items])


@pytest.mark.floor
def test_a_stop_belongs_to_its_run(tmp_path: Path, api: DemoAPI) -> None:
    """A run whose stop was requested ends at a page boundary with its partition
    incomplete, and makes no task run for a page it does not start; the next run in the
    same process (a served deployment, `pagesync.sync()` called again) is not stopped by it
    and resumes what the first one committed."""
    from prefect import get_client

    from pagesync.core.engine import Stop
    from pagesync.flows import RunHooks, flow_for, run_hooks

    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    stop = Stop()
    stop.request("test")
    with run_hooks(RunHooks(stop=stop)):
        stopped = flow_for("items")(stream="items", config=str(path), return_state=True)
    assert stopped.is_failed()
    message = str(stopped.result(raise_on_failure=False).exceptions[0])
    assert "stopped (test) before page 1; committed pages are kept" in message, message
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    [part] = partition_rows(db, "items")
    assert part["status"] == "incomplete"
    assert not api.requests

    resumed = flow_for("items")(stream="items", config=str(path), return_state=True)
    summary = resumed.result()
    assert summary["complete"] == 1 and summary["records"] == len(api.items)
    assert_exactly_once(db, "items", [i["id"] for i in api.items])

    def task_runs(state: Any) -> list[Any]:
        return task_runs_of(c, state.state_details.flow_run_id)

    with get_client(sync_client=True) as c:
        # One process sends every page event on one websocket, in order: once the second
        # run's page task runs are all recorded, any of the first run's would be too.
        wait_for(
            lambda: len(task_runs(resumed)) == 1 + summary["pages"], 60,
            what="the second run's page task runs",
        )  # fmt: skip
        [partition] = task_runs(stopped)
    assert partition.name == f"items · {part['partition']}"
    assert "stopped (test) before page 1" in (partition.state.message or "")


def test_a_config_built_in_code_is_used_by_its_run_only(tmp_path: Path, api: DemoAPI) -> None:
    """`pagesync.sync(config)` runs the config object it was given (not the file at its
    path), and nothing of it stays registered in the process after the run."""
    import pagesync
    import pagesync.flows.stream as flows_stream

    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    cfg = pagesync.load_config(path)
    renamed = cfg.extend(streams={"copy": {**STREAMS["cursor"], "source": "shop"}})
    summary = pagesync.sync(renamed, "copy")  # "copy" is not in the file
    assert summary["records"] == len(api.items)
    assert flows_stream._HOOKS.get() is None
    with pytest.raises(ConfigError, match="copy"):
        pagesync.sync(str(path), "copy")  # the file itself has no such stream


@pytest.mark.parametrize(
    ("engine", "same"), [("sqlite", False), ("duckdb", True), ("mariadb", True), ("mariadb", False)]
)
def test_nested_records_flattened_and_split_off_survive_a_failed_run(
    tmp_path: Path, api: DemoAPI, engine: str, same: bool, request: pytest.FixtureRequest
) -> None:
    """`nested:` end to end, on the at-least-once path (state in PostgreSQL, records in
    SQLite or MariaDB) and the exactly-once one (DuckDB, MariaDB): a run stopped by the API
    midway, then run again, leaves every item once, its object as `attrs__*` columns, and
    every tag once in `items__tags`."""
    spec = {**STREAMS["cursor"], "nested": {"flatten": True, "child_tables": ["tags"]}}
    dest = database_url(engine, request, tmp_path, "dest")
    state = dest if same else request.getfixturevalue("pg_url")
    path = write_config(tmp_path, api.url, {"items": spec}, state=state, destination=dest)
    api.add_fault(kind="status", status=400, after=3, times=-1, path="/cursor/items")
    with pytest.raises(ExceptionGroup):
        sync(path, "items")
    kept = {r["_parent_id"] for r in rows(dest, "items__tags")}
    assert kept and len(kept) < len(api.items)  # stopped midway, with tags committed
    api.clear_faults()
    sync(path, "items")
    assert_exactly_once(dest, "items", [i["id"] for i in api.items])
    by_id = {r["id"]: r for r in rows(dest, "items")}
    for item in api.items[::97]:
        row = by_id[item["id"]]
        assert (row["attrs__color"], row["attrs__size"]) == (
            item["attrs"]["color"], item["attrs"]["size"]
        )  # fmt: skip
        assert "tags" not in row and "attrs" not in row
    tags = sorted((r["_parent_id"], r["_index"], r["value"]) for r in rows(dest, "items__tags"))
    expected = sorted((i["id"], n, t) for i in api.items for n, t in enumerate(i["tags"]))
    assert tags == expected
