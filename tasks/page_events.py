"""Page task runs' state events: built as JSON once, sent on a websocket of pagesync's own.

Prefect's way to send an event builds it as a model (validated), hands it to its events
worker, which copies the context, looks up the run's related resources again, and passes
it through a queue thread to the global event loop, where its events client serialises and
sends it: three thread hops and four models per page (measured: 0.7 ms of client CPU per
page event; the page itself is 1 ms at 100 records). A page's event differs from the last
page's in a few fields only, so pagesync builds it as a dict around what Prefect dumped
once per partition (the task run's policy, inputs and fields; the related resources of the
partition's run context, looked up once the way Prefect's worker looks them up) and sends
it with Prefect's own events client (the same websocket, authentication, reconnection and
resending of unconfirmed events) from one thread of its own, woken only when idle and
lingering for more after each send (`LINGER`).

Where Prefect would not send to a Prefect API with one of its two websocket clients (test
harnesses, process pool forwarding), `EventSender.usable()` is False, and where this
module's events differ from Prefect's (`event_check`), the page events are built and sent
by Prefect itself (`emit_the_prefect_way`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from prefect.client.schemas.objects import State, StateDetails, StateType, TaskRun
from prefect.events.utilities import TIGHT_TIMING  # `follows` only for events this close
from prefect.utilities.text import truncated_to

log = logging.getLogger("pagesync.events")

#: Prefect's limit on a state message in an event.
MESSAGE_LIMIT = 100_000
#: How long a page waits for the sender's first connection before sending without it.
CONNECT_TIMEOUT = 60.0
#: After sending, the sender lets events gather this long before it sends again, unless a
#: flush asks sooner: pages that come faster than this wake it once per interval, not once
#: a page (each wake-up is a write to the loop's self-pipe and a turn of its loop).
LINGER = 0.05
#: What Prefect leaves out of the task run in a state change event's payload.
TASK_RUN_EXCLUDE = frozenset(
    {"id", "created", "updated", "flow_run_id", "state_id", "state_type", "state_name",
     "state", "estimated_start_time_delta", "estimated_run_time"}
)  # fmt: skip


def json_time(at: datetime) -> str:
    """A UTC time as Prefect's models write it in JSON (`...Z`)."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class PageState:
    """A state of a page task run, as its events carry it (its message cut to Prefect's
    limit, as Prefect cuts it)."""

    __slots__ = ("id", "type", "name", "message", "timestamp", "details")

    def __init__(
        self,
        id: UUID,
        type: str,
        name: str,
        timestamp: datetime,
        message: str = "",
        details: dict[str, Any] | None = None,
    ) -> None:
        self.id, self.type, self.name, self.timestamp = id, type, name, timestamp
        self.message = truncated_to(MESSAGE_LIMIT, message)
        self.details = details or {}

    def as_prefect(self) -> State[Any]:
        """The same state as Prefect's model."""
        return State(
            id=self.id, type=StateType(self.type), name=self.name, timestamp=self.timestamp,
            message=self.message or None, state_details=StateDetails(**self.details),
        )  # fmt: skip

    def as_payload(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "message": self.message,
            "state_details": self.details,
        }


class SerializedEvent:
    """An event as Prefect's events client takes it: an id and its JSON."""

    __slots__ = ("id", "text")

    def __init__(self, id: UUID, text: str) -> None:
        self.id, self.text = id, text

    def model_dump_json(self) -> str:
        return self.text


def state_change_event(
    task_run: dict[str, Any],
    task_run_id: UUID,
    related: list[dict[str, str]],
    initial: PageState | None,
    state: PageState,
    follows: tuple[UUID, datetime] | None,
) -> dict[str, Any]:
    """What `prefect.utilities.engine.emit_task_run_state_change_event` sends, for a
    task run whose payload (`task_run`, dumped as Prefect dumps it) has no tags."""
    event: dict[str, Any] = {
        "occurred": json_time(state.timestamp),
        "event": f"prefect.task-run.{state.name}",
        "resource": {
            "prefect.resource.id": f"prefect.task-run.{task_run_id}",
            "prefect.resource.name": task_run["name"],
            "prefect.run-count": str(task_run["run_count"]),
            "prefect.state-message": state.message,
            "prefect.state-name": state.name,
            "prefect.state-timestamp": state.timestamp.isoformat(),
            "prefect.state-type": state.type,
            "prefect.orchestration": "client",
        },
        "related": related,
        "payload": {
            "intended": {"from": initial.type if initial else None, "to": state.type},
            "initial_state": initial.as_payload() if initial else None,
            "validated_state": {**state.as_payload(), "data": None},
            "task_run": dict(task_run),  # a copy: the next state changes it
        },
        "id": str(state.id),
        "follows": None,
    }
    if follows is not None and -TIGHT_TIMING < state.timestamp - follows[1] < TIGHT_TIMING:
        event["follows"] = str(follows[0])
    return event


class _Follows:
    """What Prefect reads of the event an event follows: its id and when it occurred."""

    def __init__(self, id: UUID, occurred: datetime) -> None:
        self.id, self.occurred = id, occurred


def emit_the_prefect_way(
    task_run: TaskRun,
    initial: State[Any] | None,
    validated: State[Any],
    follows: tuple[UUID, datetime] | None,
) -> None:
    """Send a state change with Prefect's own builder and events worker (where this
    module's sender cannot be used, or builds events unlike Prefect's)."""
    from prefect.utilities.engine import emit_task_run_state_change_event

    emit_task_run_state_change_event(
        task_run=task_run,
        initial_state=initial,
        validated_state=validated,
        follows=_Follows(*follows) if follows else None,  # type: ignore[arg-type]
    )


class EventSender:
    """One thread with an event loop and Prefect's events client, for the whole process.

    `send()` queues an event and wakes the thread only if it is idle; the thread sends all
    that is queued, in order, waits `LINGER` for more, and sleeps once none came. `flush()`
    cuts the wait short and waits until all queued events were handed to the websocket, as
    Prefect's worker drains before a run ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[SerializedEvent] = deque()
        self._idle = True  # the thread waits for a wake-up (guarded by _cond)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._client: Any = None
        self._client_spec: tuple[type, dict[str, Any]] = (type(None), {})
        self._orchestration: Any = None
        self._broken = False
        self.sent = 0  # events handed to the websocket, for diagnostics and tests
        self.wakes = 0  # times send() woke the idle thread, likewise (guarded by _cond)
        self._queued = 0  # events ever queued, and of those sent or given up on
        self._handled = 0  # (both guarded by _cond)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def usable(self) -> bool:
        """Whether Prefect would send events to an API with one of its websocket clients
        (this sender then uses the same client, made the same way)."""
        from prefect.events.clients import PrefectCloudEventsClient, PrefectEventsClient
        from prefect.events.worker import EventsWorker, should_emit_events

        if self._broken or not should_emit_events():
            return False
        worker = EventsWorker.instance()
        if worker.client_type not in (PrefectEventsClient, PrefectCloudEventsClient):
            return False
        self._client_spec = (worker.client_type, dict(worker.client_options))
        return True

    def related(self, exclude: set[str] | None = None) -> list[dict[str, str]] | None:
        """The related resources Prefect's events worker attaches to an event sent in the
        caller's run context (its flow run, flow, deployment, tags, task run), but those
        in `exclude`; None if this sender could not connect."""
        from prefect.events.related import related_resources_from_run_context

        async def lookup() -> list[dict[str, str]]:
            found = await related_resources_from_run_context(
                client=self._orchestration, exclude=exclude or set()
            )
            return [dict(r.root) for r in found]

        loop = self._started()
        if self._broken:
            return None
        # run_coroutine_threadsafe runs it in a copy of this thread's context
        return asyncio.run_coroutine_threadsafe(lookup(), loop).result(timeout=60)

    def send(self, event_id: UUID, event: dict[str, Any]) -> None:
        loop = self._started()
        serialized = SerializedEvent(event_id, orjson.dumps(event).decode())
        with self._cond:
            if self._broken:
                return
            self._queue.append(serialized)
            self._queued += 1
            wake, self._idle = self._idle, False
            self.wakes += wake
        if wake:
            assert self._wake is not None
            loop.call_soon_threadsafe(self._wake.set)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event queued so far was sent (or given up on), however busy
        other partitions keep the sender; False on timeout."""
        with self._cond:
            target = self._queued
            if self._handled >= target:
                return True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed: it gave up on them
                self._loop.call_soon_threadsafe(self._wake.set)  # no lingering: waited for
        with self._cond:
            return self._cond.wait_for(lambda: self._handled >= target, timeout)

    def _started(self) -> asyncio.AbstractEventLoop:
        """The thread's loop, once its clients are connected (or failed to)."""
        with self._cond:
            if self._thread is None:
                # in the creator's context: Prefect's clients read its settings from it
                context = contextvars.copy_context()
                self._thread = threading.Thread(
                    target=context.run, args=(self._run,), name="pagesync-events", daemon=True
                )
                self._thread.start()
        if not self._ready.wait(CONNECT_TIMEOUT):
            with self._cond:
                if not self._broken:
                    log.warning("page task run events: no connection after %ss", CONNECT_TIMEOUT)
                self._broken = True
        assert self._loop is not None
        return self._loop

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from prefect.client.orchestration import get_client

        try:
            client_type, options = self._client_spec
            self._client = client_type(**options)
            self._orchestration = get_client()
            async with self._client, self._orchestration:
                self._ready.set()
                await self._serve()
        except Exception as exc:  # like Prefect's worker: the run goes on without them
            log.warning("page task run events could not be sent: %s", exc)
            log.debug("page task run events could not be sent", exc_info=True)
        finally:
            with self._cond:
                self._broken = True
                self._queue.clear()
                self._handled = self._queued  # given up on
                self._idle = True
                self._cond.notify_all()
            self._ready.set()

    async def _serve(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._cond:
                    if not self._queue:
                        self._idle = True
                        break
                    batch = list(self._queue)
                    self._queue.clear()
                for event in batch:
                    await self._client.emit(event)
                    self.sent += 1
                with self._cond:
                    self._handled += len(batch)
                    self._cond.notify_all()
                with contextlib.suppress(TimeoutError):  # a flush ends the wait early
                    await asyncio.wait_for(self._wake.wait(), LINGER)
                self._wake.clear()


_SENDER: EventSender | None = None
_SENDER_LOCK = threading.Lock()


def sender() -> EventSender:
    """The process's sender (a forked child gets a new one: threads do not survive fork)."""
    global _SENDER
    with _SENDER_LOCK:
        if _SENDER is None:
            _SENDER = EventSender()
        return _SENDER


def _forget_after_fork() -> None:
    global _SENDER, _SENDER_LOCK
    _SENDER, _SENDER_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
