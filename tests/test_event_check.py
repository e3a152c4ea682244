"""Page events stay right across Prefect releases: once per process pagesync compares its
own build of a page event with Prefect's, and sends Prefect's way when they differ; and
every page task run, however it is sent and from whichever thread, is recorded with its
flow run and under its partition. Against the tests' real Prefect server."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, write_config
from helpers import wait_for

from pagesync.demo.api import DemoAPI
from pagesync.tasks import event_check, page_events
from pagesync.tasks.pages import RUNNING_AFTER

pytestmark = pytest.mark.floor

PATH = "/db/items.json"
SPEC = {**STREAMS["next_url"], "params": {"_size": 200}}  # 2,000 items: 10 pages


@pytest.fixture
def fresh_check() -> Any:
    """This process checks its page events again (before and after the test)."""
    event_check.forget()
    yield
    event_check.forget()


def test_differences_name_the_key_and_both_values_but_not_ids_or_times() -> None:
    ours = {"id": "a", "occurred": "t1", "payload": {"task_run": {"name": "x", "end_time": "1",
            "run_count": 1, "new": True}}, "related": [{"role": "flow-run"}]}  # fmt: skip
    theirs = {"id": "b", "occurred": "t2", "payload": {"task_run": {"name": "x", "end_time": "2",
              "run_count": 2}}, "related": [{"role": "flow"}]}  # fmt: skip
    assert event_check.differences(ours, theirs) == [
        "payload.task_run.new: only in pagesync's event (True)",
        "payload.task_run.run_count: pagesync 1 != Prefect 2",
        "related[0].role: pagesync 'flow-run' != Prefect 'flow'",
    ]
    assert event_check.differences(ours, ours) == []


def _sync_in_background(path: Path, stream: str) -> tuple[threading.Thread, dict[str, Any]]:
    from pagesync.flows import flow_for

    box: dict[str, Any] = {}

    def run() -> None:
        box["state"] = flow_for(stream)(stream=stream, config=str(path), return_state=True)

    thread = threading.Thread(target=run, name="test-sync")
    thread.start()
    return thread, box


def _page_runs(c: Any, stream: str) -> dict[str, Any]:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    names = [f"{stream} · all · page {n}" for n in range(1, 11)] + [f"{stream} · all"]
    found = c.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))
    return {t.name: t for t in found}


@pytest.mark.parametrize("drift", [False, True], ids=["pagesyncs-events", "prefects-events"])
def test_every_page_task_run_has_its_flow_run_and_partition_on_either_path(
    tmp_path: Path,
    api: DemoAPI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_check: None,
    drift: bool,
) -> None:
    """With builders that agree, page events go through pagesync's sender; make pagesync's
    builder differ from Prefect's and one warning names the difference, and Prefect builds
    and sends every page event instead. Either way a slow page is recorded as Running
    while it runs (its state sent from the watch thread, not the page's), and every page
    task run carries its flow run and its partition's task run as parent."""
    from prefect import get_client

    if drift:
        build = page_events.state_change_event

        def drifted(*args: Any, **kwargs: Any) -> dict[str, Any]:
            event = build(*args, **kwargs)
            event["payload"]["task_run"]["drifted"] = "yes"
            return event

        monkeypatch.setattr(page_events, "state_change_event", drifted)
    stream = f"items_{uuid.uuid4().hex[:8]}"  # names unique on the session's server
    path = write_config(tmp_path, api.url, {stream: SPEC})
    api.add_faults([{"kind": "slow", "delay": RUNNING_AFTER * 5, "path": PATH, "after": 3}])
    sender = page_events.sender()
    sent_before = sender.sent
    caplog.set_level(logging.WARNING, logger="pagesync.events")
    thread, box = _sync_in_background(path, stream)
    try:
        with get_client(sync_client=True) as c:
            slow = f"{stream} · all · page 4"

            def running() -> Any:
                run = _page_runs(c, stream).get(slow)
                return run if run is not None and run.state_name == "Running" else None

            seen_running = wait_for(running, 60, what=f"{slow} shown as Running")
            assert seen_running.flow_run_id is not None
            assert seen_running.task_inputs["__parents__"]  # under its partition already
    finally:
        thread.join(120)
    flow_run_id = box["state"].state_details.flow_run_id
    assert box["state"].is_completed()
    with get_client(sync_client=True) as c:

        def all_completed() -> dict[str, Any] | None:
            runs = _page_runs(c, stream)
            done = len(runs) == 11 and all(t.state_name == "Completed" for t in runs.values())
            return runs if done else None

        by_name = wait_for(all_completed, 30, what="10 completed page task runs and a partition")
    partition = by_name.pop(f"{stream} · all")
    assert seen_running.flow_run_id == flow_run_id
    for run in by_name.values():
        assert run.flow_run_id == flow_run_id, run.name
        assert [p.id for p in run.task_inputs["__parents__"]] == [partition.id], run.name
    warnings = [r.getMessage() for r in caplog.records if "page task run events" in r.getMessage()]
    if drift:
        [warning] = warnings
        assert "payload.task_run.drifted: only in pagesync's event ('yes')" in warning
        assert sender.sent == sent_before  # Prefect sent them all
    else:
        assert warnings == []
        assert sender.sent - sent_before >= 10  # pagesync's sender sent them
