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
"""

from __future__ import annotations

import time
import uuid
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
        run.emit(Running())
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
    """A task run and the last state and event sent for it."""

    def __init__(self, task_run: TaskRun) -> None:
        self.task_run = task_run
        self.state: State[Any] | None = None
        self.event: Event | None = None

    def emit(self, state: State[Any]) -> None:
        """Move the task run to `state` and tell the server, as Prefect's engine does."""
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
        self.event = emit_task_run_state_change_event(
            task_run=tr, initial_state=last, validated_state=state, follows=self.event
        )
        self.state = state
