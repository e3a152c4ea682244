"""Page task runs as pagesync sends them to Prefect, checked without a server (the
end-to-end states, retries and logs are in test_faults and test_ui)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import datetime
from typing import Any

import orjson
import prefect.utilities.engine as prefect_engine
import pytest
from helpers import wait_for
from prefect.client.schemas.objects import State, StateDetails, TaskRun
from prefect.events import Event

from pagesync.tasks import PageTaskRuns, page_events, pages

pytestmark = pytest.mark.floor


def test_a_page_task_run_is_named_after_stream_partition_and_page() -> None:
    """Names are built by plain concatenation: a partition key holding braces (a list
    value, a parent key) is kept as it is."""
    runs = PageTaskRuns("items", "{region} 2024-01-03", retries=2)
    task_run_id = uuid.uuid4()
    run = runs._task_run(17, task_run_id)
    assert run.name == "items · {region} 2024-01-03 · page 17"
    assert run.empirical_policy.retries == 2
    assert run.dynamic_key == str(task_run_id)  # unique per page run, never shared
    recorded = pages._Recorded(runs, 17)
    assert recorded.task_run["name"] == run.name
    assert recorded.task_run["dynamic_key"] == str(recorded.id)


class Sink:
    """Takes the place of the page events' sender: keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def send(self, event_id: uuid.UUID, event: dict[str, Any]) -> None:
        assert str(event_id) == event["id"]
        self.events.append(event)


@pytest.fixture
def sent() -> Sink:
    return Sink()


def _started_page(page: int, sink: Sink) -> pages._Recorded:
    """A page's task run, just started (its Running state held), as a page's first step,
    its events built by pagesync and kept by `sink` instead of sent."""
    runs = PageTaskRuns("items", "all", retries=2)
    runs.lean, runs.related, runs.sender = True, [], sink  # type: ignore[assignment]
    run = pages._Recorded(runs, page)
    run.hold(pages.RUNNING, "Running")
    return run


def _as_prefect_sends_it(ev: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The event Prefect's own `emit_task_run_state_change_event` makes of the same task
    run and states, as the server would read it."""
    captured: list[dict[str, Any]] = []

    def state(e: dict[str, Any]) -> State[Any]:
        body = e["payload"]["validated_state"]
        return State(
            id=uuid.UUID(e["id"]), type=body["type"], name=body["name"],
            timestamp=datetime.fromisoformat(e["resource"]["prefect.state-timestamp"]),
            message=body["message"] or None, state_details=StateDetails(**body["state_details"]),
        )  # fmt: skip

    task_run_id = uuid.UUID(ev["resource"]["prefect.resource.id"].removeprefix("prefect.task-run."))
    task_run = TaskRun.model_validate({**ev["payload"]["task_run"], "id": task_run_id})
    follows = Event.model_validate(previous) if previous else None
    original = prefect_engine.emit_event
    prefect_engine.emit_event = lambda **kw: captured.append(kw)  # type: ignore[assignment]
    try:
        prefect_engine.emit_task_run_state_change_event(
            task_run=task_run,
            initial_state=state(previous) if previous else None,
            validated_state=state(ev),
            follows=follows,
        )
    finally:
        prefect_engine.emit_event = original
    kw = captured[0]
    if follows is not None:
        kw["follows"] = follows.id
    return Event(**kw).model_dump(mode="json")


def _as_server_reads_it(ev: dict[str, Any]) -> dict[str, Any]:
    return Event.model_validate_json(orjson.dumps(ev)).model_dump(mode="json")


def test_a_fast_page_is_one_completed_event_exactly_as_prefect_builds_it(sent: Sink) -> None:
    run = _started_page(3, sent)
    run.emit("COMPLETED", "Completed")
    [ev] = sent.events
    assert ev["follows"] is None
    assert ev["event"] == "prefect.task-run.Completed"
    assert ev["payload"]["intended"] == {"from": "RUNNING", "to": "COMPLETED"}
    tr = ev["payload"]["task_run"]
    assert tr["run_count"] == 1 and tr["start_time"] <= tr["end_time"]
    assert tr["expected_start_time"] == tr["start_time"]
    assert tr["empirical_policy"]["retries"] == 2
    # the held Running state is its initial state, though it was never sent
    running = {**ev, "id": str(run.previous.id)}  # type: ignore[union-attr]
    running["payload"] = {**ev["payload"], "validated_state": ev["payload"]["initial_state"]}
    running["resource"] = {
        **ev["resource"], "prefect.state-timestamp": run.previous.timestamp.isoformat(),  # type: ignore[union-attr]
    }  # fmt: skip
    mine = _as_server_reads_it(ev)
    theirs = _as_prefect_sends_it(ev, running)
    theirs["follows"] = mine["follows"]  # the held state was not sent: nothing to follow
    assert mine == theirs


def test_a_retried_then_failed_page_sends_each_state_in_order(sent: Sink) -> None:
    run = _started_page(4, sent)
    run.emit(
        pages.SCHEDULED,
        "AwaitingRetry",
        scheduled=datetime.fromisoformat("2030-01-01T00:00:00+00:00"),
    )
    run.emit(pages.RUNNING, "Retrying")
    run.emit("FAILED", "Failed", "Task run encountered an exception: ValueError('x')")
    events = sent.events
    names = [ev["event"].removeprefix("prefect.task-run.") for ev in events]
    assert names == ["Running", "AwaitingRetry", "Retrying", "Failed"]
    assert events[1]["payload"]["validated_state"]["state_details"] == {
        "scheduled_time": "2030-01-01T00:00:00Z"
    }
    final = events[-1]["payload"]["task_run"]
    assert final["run_count"] == 2  # Running and Retrying
    assert events[-1]["resource"]["prefect.state-message"].startswith("Task run encountered")
    previous = None
    for ev in events:
        assert ev["follows"] == (previous["id"] if previous else None)
        mine, theirs = _as_server_reads_it(ev), _as_prefect_sends_it(ev, previous)
        assert mine == theirs
        previous = ev
    times = [datetime.fromisoformat(ev["resource"]["prefect.state-timestamp"]) for ev in events]
    assert times == sorted(times) and len(set(times)) == len(times)


class GatedClient:
    """An events client whose every event is sent only once the test lets it through."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.sending: dict[str, threading.Event] = {}
        self.sent: list[str] = []

    def expect(self, event_id: str) -> None:
        self.gates[event_id], self.sending[event_id] = threading.Event(), threading.Event()

    async def __aenter__(self) -> GatedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def emit(self, event: Any) -> None:
        key = str(event.id)
        self.sending[key].set()
        await asyncio.to_thread(self.gates[key].wait, 30)
        self.sent.append(key)


def test_a_flush_waits_for_the_events_before_it_not_for_those_after() -> None:
    """A partition's end waits for its own pages' events, however busy other partitions
    keep the sender."""
    client = GatedClient()
    sender = page_events.EventSender()
    sender._client_spec = (lambda: client, {})  # type: ignore[assignment]
    first, later = (str(uuid.uuid4()) for _ in range(2))
    for key in (first, later):
        client.expect(key)
    sender.send(uuid.UUID(first), {"id": first})
    assert client.sending[first].wait(30)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(sender.flush(30)))
    flusher.start()
    wait_for(lambda: sender._cond._waiters, 30, what="the flush to wait")  # type: ignore[attr-defined]
    sender.send(uuid.UUID(later), {"id": later})  # queued after the flush began: not its concern
    client.gates[first].set()
    assert client.sending[later].wait(30)  # the sender is busy with the later event...
    flusher.join(30)
    assert flushed == [True] and client.sent == [first]  # ...and the flush is done
    client.gates[later].set()
    assert sender.flush(30) and client.sent == [first, later]


class ListClient(GatedClient):
    """An events client that sends every event at once."""

    async def emit(self, event: Any) -> None:
        self.sent.append(str(event.id))


def test_events_that_come_while_the_sender_lingers_wait_for_its_next_send() -> None:
    """A page every few milliseconds wakes the sender's thread once, not once a page: after
    each send it lingers for more (`LINGER`), and what came meanwhile goes out together."""
    client = ListClient()
    sender = page_events.EventSender()
    sender._client_spec = (lambda: client, {})  # type: ignore[assignment]
    for n in range(1, 21):
        sender.send(uuid.uuid4(), {"n": n})
        with sender._cond:  # sent: the next page comes within the linger
            assert sender._cond.wait_for(lambda n=n: sender._handled >= n, 30)
    assert len(client.sent) == 20
    assert sender.wakes <= 5, sender.wakes  # 20 without the linger: one a page
