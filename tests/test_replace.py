"""write_disposition: replace: every run a full refresh into a staging table, swapped in
whole once every partition is complete. Real `pagesync run` processes, killed with SIGKILL
midway; the live table is read between the runs, as a reader would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import ENGINES, STREAMS, database_url, run_cli, write_config
from helpers import partition_rows, rows, wait_for
from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import OperationalError

from pagesync.core.config import load_config
from pagesync.core.engine import StreamRun
from pagesync.core.errors import PagesyncError
from pagesync.core.keeper import KEEPER
from pagesync.core.store import Store
from pagesync.demo.api import DemoAPI

STAGING = "items__pagesync_staging"


def replace_stream(**extra: Any) -> dict[str, Any]:
    """The datasette-shaped stream, 500 records a page, its tags in a child table."""
    return {
        **STREAMS["next_url"], "params": {"_size": 500}, "write_disposition": "replace",
        "nested": {"child_tables": ["tags"]}, **extra,
    }  # fmt: skip


def snapshot(db: str) -> dict[int, str]:
    """The live table as a reader sees it: id -> updated_at."""
    return {r["id"]: r["updated_at"] for r in rows(db, "items")}


def upstream(api: DemoAPI) -> dict[int, str]:
    return {i["id"]: i["updated_at"] for i in api.items}


def tables(db: str) -> set[str]:
    engine = create_engine(db)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def tag_rows(db: str) -> Counter[int]:
    """How many tags each record has in the live child table."""
    return Counter(r["_parent_id"] for r in rows(db, "items__tags"))


def change_upstream(api: DemoAPI) -> None:
    """Records deleted, changed and added at the source between two refreshes."""
    api.delete_items(range(1, 101))
    api.touch_items(range(101, 111))
    api.add_items(30)


def run(path: Path, **env: str) -> None:
    result = run_cli("run", "items", "-c", str(path), **env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_a_refresh_killed_midway_leaves_the_old_table_whole_and_its_resume_swaps_in_the_new(
    tmp_path: Path, api: DemoAPI, engine: str, request: pytest.FixtureRequest
) -> None:
    db = database_url(engine, request, tmp_path)
    path = write_config(tmp_path, api.url, {"items": replace_stream()}, state=db)
    run(path)
    old = snapshot(db)
    assert old == upstream(api)
    old_tags = tag_rows(db)
    assert sum(old_tags.values()) == sum(len(i["tags"]) for i in api.items)

    change_upstream(api)
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="after_commit:2")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert STAGING in tables(db)  # two pages of the new refresh are there
    assert snapshot(db) == old, "a reader saw a partial table"
    assert tag_rows(db) == old_tags

    api.clear_requests()
    run(path)
    assert snapshot(db) == upstream(api), "the resumed refresh is not what the API holds"
    assert not {1, 100} & set(snapshot(db))  # deleted upstream: gone
    assert tag_rows(db) == Counter({i["id"]: len(i["tags"]) for i in api.items})
    assert not {t for t in tables(db) if "pagesync_staging" in t}
    first = api.requests[0]["query"]
    assert "updated_at__gte" in first  # resumed from the committed cursor, not page 1


def test_a_failed_partition_keeps_the_live_table_and_the_next_run_resumes_the_refresh(
    tmp_path: Path, api: DemoAPI
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    spec = {
        **STREAMS["cursor"], "path": "/categories/{value}/items", "params": {"limit": 100},
        "write_disposition": "replace",
        "partitions": {"type": "list", "values": ["books", "games", "music", "tools"]},
    }  # fmt: skip
    path = write_config(tmp_path, api.url, {"items": spec}, state=db)
    run(path)
    old = snapshot(db)
    change_upstream(api)
    api.add_fault(kind="status", status=400, after=2, times=-1, path="/categories/games/items")
    failed = run_cli("run", "items", "-c", str(path))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert snapshot(db) == old, "a failed refresh changed the live table"
    assert STAGING in tables(db)

    api.clear_faults()
    api.clear_requests()
    run(path)
    assert snapshot(db) == upstream(api)
    asked = {r["path"] for r in api.requests}
    assert asked == {"/categories/games/items"}, "complete partitions of the refresh read again"


def test_killed_just_before_the_swap_the_next_run_only_swaps(tmp_path: Path, api: DemoAPI) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    path = write_config(tmp_path, api.url, {"items": replace_stream()}, state=db)
    run(path)
    old = snapshot(db)
    change_upstream(api)
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="before_swap:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert snapshot(db) == old
    api.clear_requests()
    run(path)
    assert not api.requests, "a complete refresh was fetched again"
    assert snapshot(db) == upstream(api)
    run(path)  # a new refresh, the same data
    assert snapshot(db) == upstream(api) and len(api.requests) > 0


@pytest.mark.parametrize("point", ["in_commit"])
def test_without_a_primary_key_a_resumed_refresh_lands_every_record_once(
    tmp_path: Path, api: DemoAPI, point: str
) -> None:
    """No key to merge by in the staging table: rows carry the walk's load id, and a
    resume takes back what it writes again (the append mechanism)."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    spec = {k: v for k, v in replace_stream().items() if k not in ("primary_key", "nested")}
    path = write_config(tmp_path, api.url, {"items": spec}, state=state, destination=dest)
    run(path)
    change_upstream(api)
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT=f"{point}:3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    run(path)
    got = Counter(r["id"] for r in rows(dest, "items"))
    assert set(got) == set(upstream(api)) and set(got.values()) == {1}


def test_replace_needs_no_primary_key_and_a_backfill_is_refused(
    tmp_path: Path, api: DemoAPI
) -> None:
    spec = {k: v for k, v in replace_stream().items() if k not in ("primary_key", "nested")}
    path = write_config(tmp_path, api.url, {"items": spec})
    assert run_cli("check", "-c", str(path)).returncode == 0
    result = run_cli(
        "backfill", "items", "-c", str(path), "--start", "2024-01-01", "--end", "2024-01-02"
    )
    assert result.returncode == 1
    assert "stream items: write_disposition: replace" in result.stderr + result.stdout


def test_a_second_run_while_a_refresh_runs_stops_and_drops_nothing(
    tmp_path: Path, api: DemoAPI
) -> None:
    """Two runs of a replace stream at once: the second stops with an error naming the
    holder, before it could drop the staging table the first writes; the first swaps in a
    whole table."""
    db = f"sqlite:///{tmp_path / 'p.db'}"
    path = write_config(tmp_path, api.url, {"items": replace_stream(params={"_size": 100})},
                        state=db)  # fmt: skip
    api.add_fault(kind="slow", delay=5.0, times=-1, after=2)  # running until faults clear
    first = subprocess.Popen(
        [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: running_with_pages(db), timeout=120, what="the first run's page")
        second = run_cli("run", "items", "-c", str(path))
        assert second.returncode == 1, second.stdout + second.stderr
        line = one_line(second.stdout + second.stderr, "another run is refreshing it")
        assert f":{first.pid}:" in line and "one refresh at a time" in line
        # `pagesync state` names the refresh's holder before anyone tries
        shown = run_cli("state", "items", "-c", str(path), COLUMNS="250")
        line = one_line(shown.stdout, "refreshing in")
        assert line.startswith("items: ") and f":{first.pid}:" in line, shown.stdout
        views = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
        assert views and all(f":{first.pid}:" in v["refresh_held_by"] for v in views), views
        api.clear_faults()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, out + err
    assert snapshot(db) == upstream(api)
    assert STAGING not in tables(db)
    shown = run_cli("state", "items", "-c", str(path), COLUMNS="250")
    assert "refresh" not in shown.stdout, shown.stdout  # released at the run's end
    views = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    assert [v["refresh_held_by"] for v in views] == [None] * len(views)


def running_with_pages(db: str) -> bool:
    """A partition is running with a committed page (False before the store exists)."""
    try:
        return any(r["status"] == "running" and r["pages"] >= 1
                   for r in partition_rows(db, "items"))  # fmt: skip
    except OperationalError:
        return False


def one_line(output: str, needle: str) -> str:
    [line] = [x for x in output.splitlines() if needle in x]
    return line


@pytest.mark.parametrize("engine", ENGINES)
def test_the_refresh_is_locked_from_its_check_to_the_runs_end(
    tmp_path: Path, api: DemoAPI, engine: str, request: pytest.FixtureRequest
) -> None:
    """Between a run's look at who else refreshes the stream and its partitions' leases
    (and between its partitions) it holds no partition; the stream's refresh lock still
    keeps a second run from starting a refresh that drops the staging table it writes."""
    db = database_url(engine, request, tmp_path)
    cfg = load_config(write_config(tmp_path, api.url, {"items": replace_stream()}, state=db))
    first = StreamRun(cfg, "items", flow_run_id="run-a")
    try:
        first.prepare()
        assert not any(r["lease_owner"] for r in partition_rows(db, "items"))  # the window
        second = StreamRun(cfg, "items", flow_run_id="run-b")
        with pytest.raises(PagesyncError) as refused:
            second.prepare()
        second.close()
        assert f"held by {first.owner}" in str(refused.value)
        assert "one refresh at a time" in str(refused.value)
    finally:
        first.close()
    third = StreamRun(cfg, "items", flow_run_id="run-c")  # released at the first's end
    try:
        third.prepare()
    finally:
        third.close()


def test_a_dead_runners_refresh_lock_is_taken_over_and_a_live_ones_renewed(
    tmp_path: Path, api: DemoAPI
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    cfg = load_config(write_config(tmp_path, api.url, {"items": replace_stream()}, state=db))
    store = Store(db, lease_ttl=0.6)
    store.migrate()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = f"{socket.gethostname()}:{gone.stdout.strip()}:run-dead"
    lock, _ = store.lock_stream("items", dead)  # its process is gone: it never let go
    assert lock is not None
    shown = run_cli("state", "-c", str(cfg.path), COLUMNS="250")
    line = one_line(shown.stdout, "left unfinished by a runner that is gone")
    assert line.startswith("items: ") and dead in line and "next run takes it over" in line
    run = StreamRun(cfg, "items", flow_run_id="run-b")
    try:
        run.prepare()  # takes the dead runner's lock over
        assert not store.renew_lock(lock)  # the dead runner's is no longer the lock
        mine, holder = store.lock_stream("items", "elsewhere:1:run-x")
        assert mine is None and holder == run.owner
    finally:
        run.close()
    assert store.lock_stream("items", "elsewhere:1:run-x")[0] is not None


def test_the_keeper_renews_a_stream_lock_until_it_is_taken_over(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'p.db'}", lease_ttl=0.3)
    store.migrate()
    lock, _ = store.lock_stream("items", "here:1:run-a")
    assert lock is not None
    with KEEPER.holding(store, lock) as held:
        for _ in range(2):  # the keeper's thread moves the expiry on, twice
            before = lock_expiry(store)
            wait_for(lambda b=before: lock_expiry(store) > b, timeout=5, what="a renewal")
        assert store.lock_stream("items", "there:2:run-b")[0] is None and not held.lost
        with store.writing() as conn:  # taken over (as after an expiry)
            conn.exec_driver_sql("UPDATE pagesync_meta SET value = 'there:2:run-b\n1e12' "
                                 "WHERE key = 'refresh lock: items'")  # fmt: skip
        wait_for(lambda: held.lost, timeout=5, what="the keeper to give up")
    store.unlock_stream(lock)  # not ours any more: nothing happens
    assert store.lock_stream("items", "here:1:run-a")[0] is None


def lock_expiry(store: Store) -> float:
    with store.reading() as conn:
        value = conn.exec_driver_sql(
            "SELECT value FROM pagesync_meta WHERE key = 'refresh lock: items'"
        ).scalar()
    return float(value.partition("\n")[2])
