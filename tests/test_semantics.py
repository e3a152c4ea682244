"""Partitions, incremental cursors, checkpoint policies, failures, leases, migrations and
state import/export: each behaviour against the real demo API and a real Prefect server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, daily_stream, run_cli, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    committed_pages,
    partition_rows,
    rows,
)

from pagesync.core import store as store_mod
from pagesync.core.config import load_config
from pagesync.core.engine import StreamRun
from pagesync.core.errors import LeaseLost
from pagesync.core.store import Store
from pagesync.demo.api import DemoAPI

DAILY = daily_stream(25)
BY_CATEGORY = {
    "path": "/categories/{value}/items", "params": {"limit": 100}, "records": "data.items",
    "primary_key": ["id"], "paginator": {"type": "cursor", "path": "meta.next", "param": "cursor"},
    "partitions": {"type": "list", "values": ["books", "games", "music", "tools"]},
}  # fmt: skip


def sync(path: Path, stream: str, **kw: Any) -> Any:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), **kw)


def sync_state(path: Path, stream: str, **kw: Any) -> Any:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), return_state=True, **kw)


def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pagesync.db'}"


# -- partitions -------------------------------------------------------------------------


def test_datetime_windows_are_half_open_and_labelled_by_date(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"daily": DAILY})
    summary = sync(path, "daily")
    parts = partition_rows(db(tmp_path), "daily")
    assert [p["partition"] for p in parts] == [f"2024-01-{d:02d}" for d in range(1, 32)]
    assert summary["complete"] == 31
    assert_exactly_once(db(tmp_path), "daily", [i["id"] for i in api.items])
    for row in rows(db(tmp_path), "daily"):
        assert row["updated_at"][:10] == row["_pagesync_partition"], "record in the wrong window"
    firsts = [r["query"] for r in api.requests if "after" not in r["query"]]
    assert len(firsts) == 31
    assert all(q["updated_at__lt"] > q["updated_at__gte"] for q in firsts)
    assert_counters_match_log(db(tmp_path), "daily")


def test_list_partitions_fill_path_and_run_concurrently(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"cats": BY_CATEGORY}, source={"concurrency": 4})
    sync(path, "cats")
    assert {p["partition"] for p in partition_rows(db(tmp_path), "cats")} == {
        "books",
        "games",
        "music",
        "tools",
    }
    assert_exactly_once(db(tmp_path), "cats", [i["id"] for i in api.items])
    assert {r["path"].split("/")[2] for r in api.requests} == {"books", "games", "music", "tools"}


def test_parent_partitions_read_parent_through_its_checkpoints(
    tmp_path: Path, api: DemoAPI
) -> None:
    streams = {
        "customers": {"path": "/customers", "records": "data.items", "primary_key": ["id"],
                      "paginator": {"type": "cursor", "path": "meta.next", "param": "cursor"}},
        "orders": {"path": "/customers/{parent.id}/items", "params": {"limit": 100},
                   "records": "data.items", "primary_key": ["id"],
                   "paginator": {"type": "cursor", "path": "meta.next", "param": "cursor"},
                   "partitions": {"type": "parent", "stream": "customers", "key": "id"}},
    }  # fmt: skip
    path = write_config(tmp_path, api.url, streams)
    sync(path, "orders")
    assert len(partition_rows(db(tmp_path), "customers")) == 1  # the parent ran as its own flow
    keys = {p["partition"] for p in partition_rows(db(tmp_path), "orders")}
    assert keys == {f"id={c['id']}" for c in api.customers}
    assert_exactly_once(db(tmp_path), "orders", [i["id"] for i in api.items])


# -- failures ---------------------------------------------------------------------------


def test_failing_partitions_do_not_stop_others_and_all_errors_are_reported(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"cats": BY_CATEGORY})
    api.add_fault(kind="status", status=503, path="/categories/games/", after=2, times=-1)
    api.add_fault(kind="missing_records", path="/categories/music/", after=1, times=-1)
    state = sync_state(path, "cats")
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 2
    text = " | ".join(str(e) for e in exc.exceptions)
    assert (
        "partition games, page 3" in text
        and "HTTP 503" in text
        and "/categories/games/items" in text
    )
    assert "partition music, page 2" in text and "records: 'data.items' not found" in text
    assert "last committed cursor" in text
    parts = {p["partition"]: p for p in partition_rows(db(tmp_path), "cats")}
    assert parts["books"]["status"] == parts["tools"]["status"] == "complete"
    assert parts["games"]["status"] == "incomplete" and parts["games"]["pages"] == 2
    assert parts["music"]["status"] == "incomplete" and parts["music"]["pages"] == 1
    # Fixed source, same command: only the unfinished partitions resume, from their pages.
    api.clear_faults()
    api.clear_requests()
    sync(path, "cats")
    assert {r["path"].split("/")[2] for r in api.requests} == {"games", "music"}
    assert all("cursor" in r["query"] for r in api.requests if "/games/" in r["path"]) is False
    assert_exactly_once(db(tmp_path), "cats", [i["id"] for i in api.items])


def test_empty_source_and_empty_store_complete_cleanly(tmp_path: Path) -> None:
    with DemoAPI(items=0) as empty:
        path = write_config(tmp_path, empty.url, {"items": STREAMS["cursor"]})
        summary = sync(path, "items")
    assert summary == {**summary, "complete": 1, "records": 0}
    [part] = partition_rows(db(tmp_path), "items")
    assert part["status"] == "complete"


# -- checkpoint policy and resume points ------------------------------------------------


def crash_then_resume(path: Path, stream: str, point: str) -> subprocess.CompletedProcess[str]:
    first = run_cli("run", stream, "-c", str(path), PAGESYNC_CRASH_AT=point)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    return first


@pytest.mark.parametrize(
    ("checkpoint", "committed"),
    [
        ({"every_pages": 3}, 6),
        ({"every_pages": None, "every_records": 600}, 4),
        ({"every_pages": 1}, 7),
    ],
)
def test_checkpoint_policy_decides_what_a_crash_keeps(
    tmp_path: Path, api: DemoAPI, checkpoint: dict, committed: int
) -> None:
    spec = {**STREAMS["cursor"], "checkpoint": checkpoint}  # 150 records a page
    path = write_config(tmp_path, api.url, {"items": spec})
    crash_then_resume(path, "items", "after_write:8")  # dies before page 8's checkpoint
    assert committed_pages(db(tmp_path), "items") == committed
    api.clear_requests()
    assert run_cli("run", "items", "-c", str(path)).returncode == 0
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])
    assert_counters_match_log(db(tmp_path), "items")


def unsorted(stable: bool) -> dict:
    # /offset/items is ordered by updated_at, so a cursor on `price` sees no order.
    return {"path": "/offset/items", "records": "results", "primary_key": ["id"],
            "cursor": {"field": "price", "param": "price__gte"},
            "paginator": {"type": "offset", "limit": 100, "stable_tokens": stable}}  # fmt: skip


def test_unsorted_records_with_stable_tokens_resume_from_the_token(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"items": unsorted(True)})
    crash_then_resume(path, "items", "after_commit:5")
    api.clear_requests()
    assert run_cli("run", "items", "-c", str(path)).returncode == 0
    assert api.requests[0]["query"]["offset"] == "500"
    assert "price__gte" not in api.requests[0]["query"]
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])


def test_unsorted_records_with_unstable_tokens_restart_with_a_warning(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"items": unsorted(False)})
    first = crash_then_resume(path, "items", "after_commit:5")
    assert "not in ascending price order" in first.stderr
    api.clear_requests()
    second = run_cli("run", "items", "-c", str(path))
    assert second.returncode == 0
    assert "no safe resume point" in second.stderr and "restarting" in second.stderr
    assert api.requests[0]["query"]["offset"] == "0"
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])
    assert_counters_match_log(db(tmp_path), "items")


def test_full_refresh_stream_without_cursor_resumes_from_stable_token(
    tmp_path: Path, api: DemoAPI
) -> None:
    spec = {
        **STREAMS["page_number"],
        "paginator": {"type": "page_number", "param": "page", "stable_tokens": True},
    }
    path = write_config(tmp_path, api.url, {"items": spec})
    crash_then_resume(path, "items", "after_commit:4")
    api.clear_requests()
    assert run_cli("run", "items", "-c", str(path)).returncode == 0
    assert api.requests[0]["query"]["page"] == "5"
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])


def test_resume_inside_a_window_filters_from_the_committed_cursor(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(
        tmp_path,
        api.url,
        {"daily": {**DAILY, "partitions": {**DAILY["partitions"], "end": "2024-01-02T00:00:00Z"}}},
    )
    crash_then_resume(path, "daily", "after_commit:2")
    [part] = partition_rows(db(tmp_path), "daily")
    cursor = json.loads(part["state"])["cursor"]
    api.clear_requests()
    assert run_cli("run", "daily", "-c", str(path)).returncode == 0
    first = api.requests[0]["query"]
    assert first["updated_at__gte"] == cursor and first["updated_at__lt"] == "2024-01-02T00:00:00Z"
    day1 = [i["id"] for i in api.items if i["updated_at"] < "2024-01-02"]
    assert_exactly_once(db(tmp_path), "daily", day1)


# -- leases -----------------------------------------------------------------------------


def test_two_runs_at_once_end_with_correct_data(tmp_path: Path, api: DemoAPI) -> None:
    spec = {**STREAMS["cursor"], "params": {"limit": 50}}
    path = write_config(tmp_path, api.url, {"items": spec})
    api.add_fault(kind="slow", delay=0.02, times=-1)
    cmd = [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(path)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])
    assert_counters_match_log(db(tmp_path), "items")


def test_stale_runner_commit_is_refused_and_rolled_back(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    cfg = load_config(path)
    a = StreamRun(cfg, "items", flow_run_id="run-a")
    [spec] = a.prepare()
    part_a = a.partition(spec)
    assert part_a.open()
    part_a.step(1)
    # Run A stalls past its lease; run B takes the partition over and commits.
    store = Store(cfg.state)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE pagesync_partitions SET lease_expires = 0")
    b = StreamRun(cfg, "items", flow_run_id="run-b")
    b.prepare()
    part_b = b.partition(spec)
    assert part_b.open()
    part_b.step(3)
    version_b = partition_rows(cfg.state, "items")[0]["version"]
    with pytest.raises(LeaseLost):
        part_a.step(2)
    [row] = partition_rows(cfg.state, "items")
    assert row["version"] == version_b and row["pages"] == 3
    assert {r["_pagesync_page"] for r in rows(cfg.state, "items")} <= {1, 2, 3}
    assert all(r["flow_run_id"] != "run-a" or r["page"] == 1 for r in store.history("items"))
    a.close()
    b.close()


# -- migrations -------------------------------------------------------------------------


def test_migrations_run_once_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = db(tmp_path)
    Store(url).migrate()
    s = Store(url)
    with s.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO pagesync_partitions (stream, scope, partition, status, state, version, "
            "pages, records, updated_at) VALUES ('items', '', 'all', 'complete', "
            "'{\"cursor\": 5, \"old\": 1}', 0, 0, 0, '2024-01-01')"
        )
    calls = []

    def rename_old(conn: Any) -> None:  # v1 -> v2: a key renamed by one merge patch
        calls.append(1)
        store_mod.patch_all_states(conn, lambda st: {"old": None, "new": st.get("old")})

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, rename_old])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    Store(url).migrate()
    Store(url).migrate()
    assert calls == [1]
    [row] = partition_rows(url, "items")
    assert json.loads(row["state"]) == {"cursor": 5, "new": 1}
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT value FROM pagesync_meta").scalar() == "2"


def test_crash_during_migration_leaves_nothing_half_done(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    first = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="migrate:1")
    assert first.returncode == -signal.SIGKILL
    from sqlalchemy import create_engine, inspect

    engine = create_engine(db(tmp_path))
    assert not inspect(engine).has_table("pagesync_meta")  # rolled back whole
    engine.dispose()
    assert run_cli("run", "items", "-c", str(path)).returncode == 0
    assert_exactly_once(db(tmp_path), "items", [i["id"] for i in api.items])


# -- state import/export ----------------------------------------------------------------

AIRBYTE = [{"type": "STREAM", "stream": {"stream_descriptor": {"name": "items"},
                                          "stream_state": {"updated_at": "2024-01-20T00:00:00Z"}}}]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "start"),
    [
        (AIRBYTE, "2024-01-20T00:00:00Z"),
        ({"items": {"updated_at": "2024-01-25T00:00:00Z"}}, "2024-01-25T00:00:00Z"),
        ([], None),
    ],
    ids=["airbyte-stream", "legacy-object", "empty"],
)
def test_state_import_sets_where_the_next_run_starts(
    tmp_path: Path, api: DemoAPI, state: Any, start: str | None
) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    file = tmp_path / "state.json"
    file.write_text(json.dumps(state))
    imported = run_cli("state", "import", "items", str(file), "-c", str(path))
    assert imported.returncode == 0, imported.stderr
    assert run_cli("run", "items", "-c", str(path)).returncode == 0
    assert api.requests[0]["query"].get("updated_at__gte") == start
    expected = [i["id"] for i in api.items if start is None or i["updated_at"] >= start]
    assert_exactly_once(db(tmp_path), "items", expected)
    exported = json.loads(run_cli("state", "export", "items", "-c", str(path)).stdout)
    assert exported[0]["stream"]["stream_state"] == {
        "updated_at": max(i["updated_at"] for i in api.items)
    }
    assert exported[0]["type"] == "STREAM"


def test_state_import_rejects_garbage_clearly(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    file = tmp_path / "state.json"
    file.write_text('{"items": {"wrong": 1}}')
    bad = run_cli("state", "import", "items", str(file), "-c", str(path))
    assert bad.returncode == 2 and "no value for cursor field 'updated_at'" in bad.stderr
    file.write_text("{not json")
    worse = run_cli("state", "import", "items", str(file), "-c", str(path))
    assert worse.returncode == 2 and "cannot read JSON state" in worse.stderr


# -- backfills --------------------------------------------------------------------------


def test_backfill_resumes_by_id_and_never_moves_the_high_water_mark_back(
    tmp_path: Path, api: DemoAPI
) -> None:
    # One window at a time, so the fault below lands in the second window, not the first.
    path = write_config(tmp_path, api.url, {"daily": DAILY}, source={"concurrency": 1})
    sync(path, "daily")
    store = Store(load_config(path).state)
    hwm = store.high_water_mark("daily")
    api.add_fault(kind="status", status=500, times=-1, path="/next/items", after=5)
    api.clear_requests()
    args = ["backfill", "daily", "--start", "2024-01-03", "--end", "2024-01-06", "-c", str(path)]
    failed = run_cli(*args)
    assert failed.returncode == 1
    complete = {p["partition"] for p in store.partitions("daily", scope=None)
                if p["scope"] and p["status"] == "complete"}  # fmt: skip
    assert "2024-01-03" in complete
    api.clear_faults()
    api.clear_requests()
    assert run_cli(*args).returncode == 0
    windows = {r["query"]["updated_at__lt"][:10] for r in api.requests}
    assert "2024-01-04" not in windows  # 2024-01-03's window completed the first time
    assert run_cli(*args).returncode == 0
    assert store.high_water_mark("daily") == hwm
    scoped = [p for p in store.partitions("daily", scope=None) if p["scope"]]
    assert [p["partition"] for p in scoped] == ["2024-01-03", "2024-01-04", "2024-01-05"]
    assert all(p["status"] == "complete" for p in scoped)
