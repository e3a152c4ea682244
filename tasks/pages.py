"""Page task runs: each page a Prefect task run of its own, retried, without the task engine.

Prefect 3 records a task run from the state events its client emits (the server's task
run recorder writes them); its task engine wraps that in states, contexts, a transaction,
a result record, telemetry and hooks, about 9 ms of client CPU per task run on the
measured machine, more than a 1,000-record page's own work. A page uses none of those
extras (no cache, no result storage, no hooks), so pagesync emits the same events with
Prefect's own `emit_task_run_state_change_event`, under 2 ms a page (measured), and the
server records the same task runs: named `stream · partition · page N`, nested under the
partition's task run, in the states Prefect's engine gives them (Running, AwaitingRetry
and Retrying on a retried error, Completed or Failed), with the failure's traceback in the
task run's logs. The Pending state the engine emits first is left out: nothing orchestrates
a page before it runs, and the server records one event fewer per page.

A page's Running state is held back for `RUNNING_AFTER` seconds: sent then if the page is
still running (a slow API, a retry's wait), and folded into the Completed event if the
page finished sooner. A page of a fast API is one event instead of two, which halves the
server's work per page (measured: the task run recorder's CPU is most of it), and the
dashboard still shows every page's start, end, duration and final state, and as Running
every page that runs long enough to be seen running.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.schemas.objects import TaskRun, TaskRunPolicy, TaskRunResult
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events.schemas.events import Event
from prefect.logging.loggers import task_run_logger
from prefect.states import AwaitingRetry, Completed, Crashed, Failed, Retrying, Running, State
from prefect.utilities.engine import emit_task_run_state_change_event

from pagesync.engine import STOP, PageResult, PartitionRun
from pagesync.errors import LeaseLost

#: The task key every page task run shares (the UI groups task runs by it).
TASK_KEY = "pagesync-page"

#: A page still running after this many seconds is shown as Running (see above).
RUNNING_AFTER = 1.0


def worth_retrying(exc: BaseException) -> bool:
    """Retry network and server trouble; not config errors, loops, a lost lease or a stop."""
    if isinstance(exc, LeaseLost) or STOP.is_set():
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

    def __call__(self, part: PartitionRun, page: int) -> PageResult:
        run = _Recorded(self._task_run(page))
        run.hold(Running())
        _WATCH.watch(run)
        attempt = 0
        while True:
            try:
                result = part.step(page, str(run.task_run.id))
            except Exception as exc:
                log = task_run_logger(run.task_run, flow_run=self.flow_run)
                if attempt < self.retries and worth_retrying(exc):
                    attempt += 1
                    log.warning(
                        "Task run failed with exception: %r - Retry %s/%s will start %s "
                        "second(s) from now", exc, attempt, self.retries, self.delay,
                    )  # fmt: skip
                    later = datetime.now(UTC) + timedelta(seconds=self.delay)
                    run.emit(AwaitingRetry(scheduled_time=later))
                    time.sleep(self.delay)  # the retry's delay, as Prefect's engine waits it
                    run.emit(Retrying())
                    continue
                exhausted = " - Retries are exhausted" if self.retries else ""
                log.error("Task run failed with exception: %r%s", exc, exhausted, exc_info=True)
                run.emit(Failed(message=f"Task run encountered an exception: {exc!r}"))
                raise
            except BaseException as exc:  # interrupted: the page did not finish
                run.emit(Crashed(message=f"Execution was interrupted: {type(exc).__name__}"))
                raise
            run.emit(Completed())
            return result

    def _task_run(self, page: int) -> TaskRun:
        flow_run = self.flow_run
        task_run_id = uuid.uuid4()
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
    """A task run, its last state, and the last event sent for it."""

    def __init__(self, task_run: TaskRun) -> None:
        self.task_run = task_run
        self.state: State[Any] | None = None
        self.previous: State[Any] | None = None  # the state before `state`
        self.event: Event | None = None
        self.held = False  # `state` is not sent yet
        self.lock = threading.Lock()

    def hold(self, state: State[Any]) -> None:
        """Move the task run to `state` without telling the server yet (`send_held`)."""
        with self.lock:
            self._move(state)
            self.held = True

    def send_held(self) -> None:
        """Send the held state, if it is still the task run's state."""
        with self.lock:
            self._send_held()

    def emit(self, state: State[Any]) -> None:
        """Move the task run to `state` and tell the server, as Prefect's engine does.

        A held Running state is sent first, unless `state` is Completed: the Completed
        event says where it came from, and the task run carries the start time."""
        with self.lock:
            if not state.is_completed():
                self._send_held()
            self._move(state)
            self._send(self.previous, state)

    def _move(self, state: State[Any]) -> None:
        tr, last = self.task_run, self.state
        state.state_details.task_run_id = tr.id
        state.state_details.flow_run_id = tr.flow_run_id
        if last is not None:
            if state.timestamp <= last.timestamp:  # states need distinct, ordered times
                state.timestamp = last.timestamp + timedelta(microseconds=1)
            if last.is_running():
                tr.total_run_time += state.timestamp - last.timestamp
        if state.is_running():
            tr.run_count += 1
            tr.start_time = tr.start_time or state.timestamp
        if state.is_final():
            tr.end_time = state.timestamp
        if tr.expected_start_time is None:
            tr.expected_start_time = state.timestamp
        tr.state, tr.state_id = state, state.id
        tr.state_type, tr.state_name = state.type, state.name
        self.previous, self.state = last, state

    def _send_held(self) -> None:
        if self.held:
            self._send(self.previous, self.state)  # type: ignore[arg-type]

    def _send(self, initial: State[Any] | None, state: State[Any]) -> None:
        self.event = emit_task_run_state_change_event(
            task_run=self.task_run, initial_state=initial, validated_state=state,
            follows=self.event,
        )  # fmt: skip
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
