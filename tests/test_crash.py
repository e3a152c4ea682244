"""Crash and resume: a real `pagesync run` process killed with SIGKILL, then run again.

After the second run every source record is in the destination exactly once, and the
second run fetched no more than `every_pages` pages that the first one had committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STREAMS, database_url, run_cli, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    committed_pages,
    rows,
    wait_for,
)

from pagesync.demo.api import DemoAPI

PAGE = 100


def start_run(path: Path, stream: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pagesync.cli", "run", stream, "-c", str(path)],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def data_requests(api: DemoAPI) -> list[dict]:
    return [r for r in api.requests if r["fault"] is None]


def stream_spec(every_pages: int) -> dict:
    spec = dict(STREAMS["next_url"], params={"_size": PAGE})
    return {**spec, "checkpoint": {"every_pages": every_pages}}


@pytest.mark.parametrize("every_pages", [1, 3])
@pytest.mark.parametrize("store", ["sqlite", "postgres", "duckdb", "mariadb"])
def test_sigkill_mid_request_then_resume(
    tmp_path: Path, api: DemoAPI, store: str, every_pages: int, request: pytest.FixtureRequest
) -> None:
    state = database_url(store, request, tmp_path)
    path = write_config(tmp_path, api.url, {"items": stream_spec(every_pages)}, state=state)
    total_pages = -(-len(api.items) // PAGE)
    # The 9th request hangs: the process is killed while waiting on the network.
    api.add_fault(kind="slow", delay=120, after=8, path="/db/items.json")
    proc = start_run(path, "items")
    wait_for(lambda: len(api.requests) >= 9, what="the 9th request")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    committed = committed_pages(state, "items")
    assert 0 < committed < total_pages
    api.clear_faults()
    api.clear_requests()
    result = run_cli("run", "items", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr

    assert_exactly_once(state, "items", [i["id"] for i in api.items])
    assert_counters_match_log(state, "items")
    refetched = len(data_requests(api)) - (total_pages - committed)
    assert refetched <= every_pages, f"second run refetched {refetched} committed pages"
    assert "updated_at__gte" in api.requests[0]["query"], "resume must filter from the cursor"


#: The guarantees table of the README on each engine: every point of the page cycle on
#: SQLite; on the others, the two that decide it: SIGKILL between the records' write and
#: the checkpoint, and inside the checkpoint's transaction, with the destination the same
#: database as the state (exactly-once) or another one (at-least-once with upsert).
CYCLE_KILLS = [
    *[("sqlite", "same", p) for p in ("after_fetch", "after_write", "in_commit", "after_commit")],
    ("sqlite", "separate", "after_write"),
    *[(e, m, p) for e in ("duckdb", "mariadb") for m in ("same", "separate")
      for p in ("after_write", "in_commit")],
]  # fmt: skip


@pytest.mark.parametrize(("engine", "mode", "point"), CYCLE_KILLS)
def test_sigkill_at_page_cycle_points_then_resume(
    tmp_path: Path, api: DemoAPI, engine: str, mode: str, point: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    db = database_url(engine, request, tmp_path)
    # Separate: the state in SQLite, the records in the engine under test (and vice versa
    # for SQLite itself), so the records are written before the checkpoint, not with it.
    state = f"sqlite:///{tmp_path / 'state.db'}" if mode == "separate" else db
    if engine == "sqlite" and mode == "separate":
        db = f"sqlite:///{tmp_path / 'dest.db'}"
    path = write_config(
        tmp_path, api.url, {"items": stream_spec(1)}, state=state,
        destination=db if mode == "separate" else None,
    )  # fmt: skip
    result = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT=f"{point}:5")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    committed = committed_pages(state, "items")
    # in_commit dies inside the 5th commit's transaction: it must not count.
    expected = {"after_fetch": 4, "after_write": 4, "in_commit": 4, "after_commit": 5}[point]
    assert committed == expected
    written = {r["_pagesync_page"] for r in rows(db, "items")}
    if mode == "same":  # records commit with their checkpoint: none past it
        assert written == set(range(1, expected + 1))
    else:  # upserted before the checkpoint: the 5th page is there, its checkpoint is not
        assert written == set(range(1, 6))
    result = run_cli("run", "items", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(db, "items", [i["id"] for i in api.items])
    assert_counters_match_log(state, "items")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_cleanly_and_keep_committed_pages(
    tmp_path: Path, api: DemoAPI, sig: signal.Signals
) -> None:
    state = f"sqlite:///{tmp_path / 'p.db'}"
    path = write_config(tmp_path, api.url, {"items": stream_spec(1)}, state=state)
    api.add_fault(kind="slow", delay=0.2, times=-1, path="/db/items.json")
    proc = start_run(path, "items")
    wait_for(lambda: committed_pages(state, "items") >= 3, what="3 committed pages")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=15)  # "within a few seconds"
    assert proc.returncode == 128 + sig, out
    assert "stopping after the page in progress" in out and "Traceback" not in out
    from helpers import partition_rows

    [part] = partition_rows(state, "items")
    assert part["status"] == "incomplete" and part["lease_owner"] is None
    assert part["pages"] >= 3
    api.clear_faults()
    result = run_cli("run", "items", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(state, "items", [i["id"] for i in api.items])
    assert_counters_match_log(state, "items")
