"""A run whose worker hangs until its lease expires, while another run takes over.

test_semantics.py's stale-runner test drives two runs in one process, pausing one between
page calls. Here the stale runner is a real `pagesync run` process hung on the network in
the middle of its partition (its next request never answers), holding the lease; its lease
runs out (the clock is moved: the lease's expiry is set in the past, as if its 5 minutes
had passed); a second `pagesync run` takes the partition over and finishes it. Then the
hung request is cut, the stale run carries on from its own old checkpoint, and its commit
must be refused: no duplicate rows, no lost record, no checkpoint moved backwards.

With a separate destination (at-least-once), the stale run has also written pages the
checkpoint never covered, before and after it hung: they are upserts of the same records.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import STREAMS, database_url, run_cli, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    committed_pages,
    partition_rows,
    rows,
    wait_for,
)
from sqlalchemy import create_engine, text

from pagesync.demo.api import DemoAPI

PAGE = 100  # 2000 items: 20 pages


@pytest.mark.parametrize("engine", ["sqlite", "mariadb"])
@pytest.mark.parametrize(
    ("every_pages", "separate"),
    [(1, False), (3, True)],
    ids=["same-database", "separate-destination"],
)
def test_hung_run_loses_its_lease_to_another_and_cannot_commit(
    tmp_path: Path, api: DemoAPI, every_pages: int, separate: bool, engine: str,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    state = database_url(engine, request, tmp_path, "state")
    dest = f"sqlite:///{tmp_path / 'dest.db'}" if separate else state
    spec = {**STREAMS["cursor"], "params": {"limit": PAGE},
            "checkpoint": {"every_pages": every_pages}}  # fmt: skip
    path = write_config(
        tmp_path, api.url, {"items": spec}, state=state, destination=dest if separate else None
    )
    # Run A: two checkpoints in, the request for the page after the next one hangs.
    committed_before_hang = 2 * every_pages
    hang_at = committed_before_hang + (2 if separate else 1)
    api.add_fault(kind="slow", delay=300, after=hang_at - 1, times=1, path="/cursor/items")
    a = subprocess.Popen(
        [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                any(r["fault"] for r in api.requests)
                and committed_pages(state, "items") == committed_before_hang
                and len(rows(dest, "items")) == (hang_at - 1) * PAGE
            ),
            what="run A hung on its request",
        )
        [held] = partition_rows(state, "items")
        assert (
            held["lease_owner"].split(":")[1] == str(a.pid) and held["lease_expires"] > time.time()
        )
        if separate:  # a page past the checkpoint is already in the destination
            assert {r["_pagesync_page"] for r in rows(dest, "items")} == set(range(1, hang_at))

        # A stays hung past its lease: the clock moves on, its expiry is behind us.
        engine = create_engine(state)
        with engine.begin() as conn:
            conn.execute(text("UPDATE pagesync_partitions SET lease_expires = :t"),
                         {"t": time.time() - 1})  # fmt: skip
        engine.dispose()

        # Run B takes the partition over and finishes it while A still hangs.
        b = run_cli("run", "items", "-c", str(path))
        assert b.returncode == 0, b.stdout + b.stderr
        assert a.poll() is None, "run A should still be hung"
        [done] = partition_rows(state, "items")
        assert done["status"] == "complete" and done["lease_owner"] is None
        log_b = [(p["page"], p["flow_run_id"]) for p in history(state)]

        # A's request is cut (the API restarts); A goes on from its own old checkpoint.
        api.clear_requests()
        api.stop()
        api.start()
        out, _ = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGKILL)
            a.wait()
    assert a.returncode == 1, out
    assert "taken over by another run" in out, out
    assert api.requests, "run A never carried on after its request was cut"

    # Nothing of A's late work was committed, nothing of B's was undone.
    [after] = partition_rows(state, "items")
    assert after == done, "the stale run moved the checkpoint"
    assert [(p["page"], p["flow_run_id"]) for p in history(state)] == log_b
    pages = [p["page"] for p in history(state)]
    assert sorted(pages) == list(range(1, len(pages) + 1)), "a page committed twice"
    runs = [flow_run for _, flow_run in log_b]
    a_run = runs[0]
    assert runs.count(a_run) == committed_before_hang and len(set(runs)) == 2
    assert_exactly_once(dest, "items", [i["id"] for i in api.items])
    assert_counters_match_log(state, "items")


def history(state: str) -> list[dict]:
    engine = create_engine(state)
    try:
        with engine.connect() as conn:
            q = text("SELECT page, flow_run_id FROM pagesync_pages ORDER BY id")
            return [dict(r) for r in conn.execute(q).mappings()]
    finally:
        engine.dispose()
