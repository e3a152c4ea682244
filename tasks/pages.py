"""Page task runs: each page a Prefect task run of its own, retried, without the task engine.

Prefect 3 records a task run from the state events its client emits (the server's task
run recorder writes them); its task engine wraps that in states, contexts, a transaction,
a result record, telemetry and hooks, about 9 ms of client CPU per task run on the
measured machine, more than a 1,000-record page's own work. A page uses none of those
extras (no cache, no result storage, no hooks), so pagesync emits the same events as
Prefect's `emit_task_run_state_change_event` would (built and sent by `page_events`,
about 0.1 ms a page), and the server records the same task runs: named
`stream · partition · page N`, nested under the partition's task run, in the states
Prefect's engine gives them (Running, AwaitingRetry and Retrying on a retried error,
Completed or Failed), with the failure's traceback in the task run's logs. The final
state's message is the page's checkpoint (`messages`): what it committed, at which cursor,
on which attempt, or what was kept when it failed. The Pending
state the engine emits first is left out: nothing orchestrates a page before it runs, and
the server records one event fewer per page.

A page's Running state is held back for `RUNNING_AFTER` seconds: sent then if the page is
still running (a slow API, a retry's wait), and folded into the Completed event if the
page finished sooner. A page of a fast API is one event instead of two, which halves the
server's work per page (measured: the task run recorder's CPU is most of it), and the
dashboard still shows every page's start, end, duration and final state, and as Running
every page that runs long enough to be seen running.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.schemas.objects import (
    TERMINAL_STATES,
    State,
    StateType,
    TaskRun,
    TaskRunPolicy,
    TaskRunResult,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.loggers import task_run_logger

from pagesync.core.engine import PageResult, PartitionRun
from pagesync.core.errors import LeaseLost

from . import event_check, page_events
from .messages import failed_message, page_message
from .page_events import PageState

log = logging.getLogger("pagesync.pages")

RUNNING, SCHEDULED, COMPLETED, FAILED, CRASHED = (
    t.value for t in (StateType.RUNNING, StateType.SCHEDULED, StateType.COMPLETED,
                      StateType.FAILED, StateType.CRASHED)
)  # fmt: skip
FINAL = frozenset(t.value for t in TERMINAL_STATES)

#: The task key every page task run shares (the UI groups task runs by it).
TASK_KEY = "pagesync-page"

#: A page still running after this many seconds is shown as Running (see above).
RUNNING_AFTER = 1.0


def worth_retrying(exc: BaseException, part: PartitionRun) -> bool:
    """Retry network and server trouble; not config errors, loops, a lost lease or a stop."""
    if isinstance(exc, LeaseLost) or part.run.stop.is_set():
        return False
    return bool(getattr(exc, "transient", True))


class PageTaskRuns:
    """Runs the pages of one partition, each in a task run of its own; made inside the
    partition's task, whose run is their parent."""

    def __init__(self, stream: str, partition: str, retries: int, delay: float = 1.0) -> None:
        flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
        self.flow_run = flow_ctx.flow_run if flow_ctx else None
        self.parent = task_ctx.task_run if task_ctx else None
        self.prefix = f"{stream} · {partition} · page "  # keys may hold braces: no format()
        self.retries = retries
        self.delay = delay
        self.sender = page_events.sender()
        self.lean = self.sender.usable()
        # What every page's events share, dumped by Prefect once per partition.
        self.template = self._task_run(0, uuid.uuid4()).model_dump(
            mode="json", exclude_none=True, exclude=set(page_events.TASK_RUN_EXCLUDE)
        )
        # The partition's run context: states sent from the watch thread carry its flow
        # run and task run too, whichever way they are sent.
        self.context = contextvars.copy_context()
        self.related: list[dict[str, str]] = []
        if self.lean:  # else Prefect's events worker looks them up for every event
            try:
                related = self.sender.related()
            except Exception:
                log.warning("could not look up the run's related resources", exc_info=True)
                related = None
            self.related = related or []
            self.lean = related is not None and event_check.ours_match(self._both_builds)

    def __call__(self, part: PartitionRun, page: int) -> PageResult:
        run = _Recorded(self, page)
        run.hold(RUNNING, "Running")
        _WATCH.watch(run)
        lease = part.lease
        before = (lease.pages, lease.records) if lease else (0, 0)  # the last checkpoint's
        attempt = 0
        while True:
            try:
                result = part.step(page, str(run.id))
            except Exception as exc:
                log = task_run_logger(self._task_run(page, run.id), flow_run=self.flow_run)
                if attempt < self.retries and worth_retrying(exc, part):
                    attempt += 1
                    log.warning(
                        "Task run failed with exception: %r - Retry %s/%s will start %s "
                        "second(s) from now", exc, attempt, self.retries, self.delay,
                    )  # fmt: skip
                    later = datetime.now(UTC) + timedelta(seconds=self.delay)
                    run.emit(SCHEDULED, "AwaitingRetry", scheduled=later)
                    time.sleep(self.delay)  # the retry's delay, as Prefect's engine waits it
                    run.emit(RUNNING, "Retrying")
                    continue
                exhausted = " - Retries are exhausted" if self.retries else ""
                log.error("Task run failed with exception: %r%s", exc, exhausted, exc_info=True)
                run.emit(FAILED, "Failed", failed_message(page, part.next_page, exc))
                raise
            except BaseException as exc:  # interrupted: the page did not finish
                kept = failed_message(page, part.next_page, exc)
                run.emit(CRASHED, "Crashed", f"Execution was interrupted: {kept}")
                raise
            after = (lease.pages, lease.records) if lease else before
            message = page_message(
                result, committed_pages=after[0] - before[0],
                committed_records=after[1] - before[1], attempt=attempt + 1,
                attempts=self.retries + 1, policy=part.stream.checkpoint,
            )  # fmt: skip
            run.emit(COMPLETED, "Completed", message)
            return result

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the pages' events are sent (at the partition's end)."""
        if self.lean:
            self.sender.flush(timeout)

    def _both_builds(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """A synthetic page's Completed event (after a held Running state, with a message),
        built by pagesync and, captured unsent, by Prefect with its worker's related
        resources: for `event_check`."""
        page = _Recorded(self, 0)
        page.hold(RUNNING, "Running")
        page._move(COMPLETED, "Completed", "committed 0 records · page 0")
        ours = page.event()
        task_run, initial, state = page.as_prefect()
        theirs = event_check.built_by_prefect(task_run, initial, state)
        involved = {theirs["resource"]["prefect.resource.id"]}
        theirs["related"] = [*theirs["related"], *(self.sender.related(involved) or [])]
        return ours, theirs

    def _task_run(self, page: int, task_run_id: uuid.UUID) -> TaskRun:
        """The page's task run as a Prefect model: for the template and the task run's logs."""
        flow_run = self.flow_run
        return TaskRun(
            id=task_run_id,
            name=f"{self.prefix}{page}",
            flow_run_id=flow_run.id if flow_run else None,
            task_key=TASK_KEY,
            dynamic_key=str(task_run_id),  # unique: a retried flow run gets new page runs
            empirical_policy=TaskRunPolicy(retries=self.retries, retry_delay=int(self.delay)),
            task_inputs={"__parents__": [TaskRunResult(id=self.parent.id)]} if self.parent else {},
            flow_run_run_count=flow_run.run_count if flow_run else 0,
        )


class _Recorded:
    """A page's task run: its fields as its events carry them, its last state, and the
    last event sent for it."""

    def __init__(self, runs: PageTaskRuns, page: int) -> None:
        self.runs = runs
        self.id = uuid.uuid4()
        self.task_run: dict[str, Any] = {
            **runs.template, "name": f"{runs.prefix}{page}", "dynamic_key": str(self.id),
        }  # fmt: skip
        self.total = timedelta()  # in Running states, summed exactly
        self.state: PageState | None = None
        self.previous: PageState | None = None  # the state before `state`
        self.follows: tuple[uuid.UUID, datetime] | None = None  # the last event sent
        self.held = False  # `state` is not sent yet
        self.lock = threading.Lock()

    def hold(self, type: str, name: str) -> None:
        """Move the task run to a state without telling the server yet (`send_held`)."""
        with self.lock:
            self._move(type, name)
            self.held = True

    def send_held(self) -> None:
        """Send the held state, if it is still the task run's state."""
        with self.lock:
            self._send_held()

    def emit(
        self, type: str, name: str, message: str = "", scheduled: datetime | None = None
    ) -> None:
        """Move the task run to a state and tell the server, as Prefect's engine does.

        A held Running state is sent first, unless the new state is Completed: the
        Completed event says where it came from, and the task run carries the start time."""
        with self.lock:
            if type != COMPLETED:
                self._send_held()
            self._move(type, name, message, scheduled)
            self._send()

    def _move(
        self, type: str, name: str, message: str = "", scheduled: datetime | None = None
    ) -> None:
        now, last = datetime.now(UTC), self.state
        if last is not None:
            if now <= last.timestamp:  # states need distinct, ordered times
                now = last.timestamp + timedelta(microseconds=1)
            if last.type == RUNNING:
                self.total += now - last.timestamp
        details = {"scheduled_time": page_events.json_time(scheduled)} if scheduled else None
        state = PageState(uuid.uuid4(), type, name, now, message, details)
        tr = self.task_run
        if type == RUNNING:
            tr["run_count"] += 1
            tr.setdefault("start_time", page_events.json_time(now))  # the first Running's
        if type in FINAL:
            tr["end_time"] = page_events.json_time(now)
        tr.setdefault("expected_start_time", page_events.json_time(now))
        tr["total_run_time"] = self.total.total_seconds()
        self.previous, self.state = last, state

    def _send_held(self) -> None:
        if self.held:
            self._send()

    def event(self) -> dict[str, Any]:
        """The state change event of the current state, as pagesync builds it."""
        assert self.state is not None
        return page_events.state_change_event(
            self.task_run, self.id, self.runs.related, self.previous, self.state, self.follows
        )

    def as_prefect(self) -> tuple[TaskRun, State[Any] | None, State[Any]]:
        """The task run and its last two states as Prefect's models."""
        assert self.state is not None
        flow_run = self.runs.flow_run
        task_run = TaskRun.model_validate(
            {**self.task_run, "id": self.id, "flow_run_id": flow_run.id if flow_run else None}
        )
        initial = self.previous.as_prefect() if self.previous else None
        return task_run, initial, self.state.as_prefect()

    def _send(self) -> None:
        state, runs = self.state, self.runs
        assert state is not None
        if runs.lean:
            runs.sender.send(state.id, self.event())
        else:  # in the partition's context, whichever thread sends
            runs.context.copy().run(page_events.emit_the_prefect_way, *self.as_prefect(),
                                    self.follows)  # fmt: skip
        self.follows = (state.id, state.timestamp)
        self.held = False


class _Watch:
    """Sends the held Running state of every page still running about `RUNNING_AFTER`
    seconds after it started: one thread for the process, woken at most twice a second."""

    def __init__(self) -> None:
        self.due: deque[tuple[float, _Recorded]] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def watch(self, run: _Recorded) -> None:
        with self.cond:
            self.due.append((time.monotonic() + RUNNING_AFTER, run))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._loop, name="pagesync-running-states", daemon=True
                )
                self.thread.start()
            elif len(self.due) == 1:
                self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.due:
                    self.cond.wait()
                wait = self.due[0][0] - time.monotonic()
                if wait > 0:  # at least half of RUNNING_AFTER: one wake-up for many pages
                    self.cond.wait(max(wait, RUNNING_AFTER / 2))
                    continue
                now, ready = time.monotonic(), []
                while self.due and self.due[0][0] <= now:
                    ready.append(self.due.popleft()[1])
            for run in ready:
                run.send_held()  # nothing to send for the pages that ended


_WATCH = _Watch()
