"""The stream flow: plan partitions, run them concurrently, report every error at the end."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from prefect import Flow
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.urls import url_for

from pagesync.core.config import Config, load_config
from pagesync.core.engine import ABORT_AFTER, Observer, PartitionOutcome, Stop, StreamRun
from pagesync.core.errors import ConfigError
from pagesync.core.partitions import PartitionSpec
from pagesync.tasks import tagged
from pagesync.tasks.progress import ProgressArtifacts, artifact_key, scope_label

from .secrets import resolve_secret_blocks


@dataclass
class RunHooks:
    """What code that calls a stream's flow in its own process hands to that run: objects,
    not flow parameters (parameters are stored by the Prefect API and shown in the UI)."""

    #: A config built in code (`pagesync.sync(config, ...)`), used instead of the file.
    config: Config | None = None
    #: Told of progress (the CLI's live display), besides the run's progress artifacts.
    observers: list[Observer] = field(default_factory=list)
    #: Set by whoever handles SIGTERM and Ctrl-C for the run (the CLI).
    stop: Stop | None = None


_HOOKS: ContextVar[RunHooks | None] = ContextVar("pagesync_run_hooks", default=None)


@contextmanager
def run_hooks(hooks: RunHooks) -> Iterator[RunHooks]:
    """Flows called inside the block (in this thread, and the partition threads it starts)
    get `hooks`; nothing outlives the block."""
    token = _HOOKS.set(hooks)
    try:
        yield hooks
    finally:
        _HOOKS.reset(token)


def backfill_scope(
    stream: str, start: datetime | None, end: datetime | None, backfill_id: str | None
) -> str:
    """The id under which a backfill's windows keep their checkpoints.

    Derived from stream and range by default, so triggering the same backfill again (UI,
    CLI or Retry) finds its complete windows and resumes the others.
    """
    if backfill_id:
        return backfill_id
    lo = start.strftime("%Y-%m-%dT%H:%M:%SZ") if start else "-"
    hi = end.strftime("%Y-%m-%dT%H:%M:%SZ") if end else "-"
    return f"backfill {stream} {lo}..{hi}"


#: Seconds a stopped flow run waits for its partitions to end (Prefect's runners and workers
#: kill a process 30 s after its SIGTERM).
STOP_GRACE = 10.0

#: Parameter types stored without Prefect's encoder: as they are, a datetime in ISO form.
_PLAIN = (str, int, float, bool, type(None), datetime)


class StreamFlow(Flow[..., dict[str, Any]]):
    """A Prefect flow whose plain parameters skip Prefect's general-purpose encoder.

    Every flow run's parameters go through `Flow.serialize_parameters`, whose encoder is
    FastAPI's: importing it was the largest part of a `pagesync run`'s start after
    Prefect's own import (docs/performance.md). A stream flow's parameters are strings,
    booleans, None and datetimes, which encode to themselves (datetimes to their ISO
    form); anything else takes Prefect's own path. tests/test_stream_flow.py holds the two
    to the same output.
    """

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        if all(type(v) in _PLAIN for v in parameters.values()):
            return {k: v.isoformat() if type(v) is datetime else v for k, v in parameters.items()}
        return super().serialize_parameters(parameters)

    def with_options(self, **options: Any) -> StreamFlow:
        new = super().with_options(**options)  # a plain Flow: Prefect builds it by name
        new.__class__ = StreamFlow  # adds no state, so the copy is whole
        return new  # type: ignore[return-value]


@partial(StreamFlow, name="pagesync", persist_result=False, log_prints=False)
def sync_stream(
    stream: str,
    config: str | None = None,
    full_refresh: bool = False,
    start: datetime | None = None,
    end: datetime | None = None,
    backfill_id: str | None = None,
    fan_out: str | None = None,
) -> dict[str, Any]:
    """Sync one stream: each partition a task, each page a retried, checkpointed subtask.

    Args:
        stream: Name of the stream in the config file.
        config: Path of pagesync.yaml (default: $PAGESYNC_CONFIG, else ./pagesync.yaml).
        full_refresh: Ignore the high-water mark and completed partitions.
        start: Backfill: first instant to sync (inclusive). With `end`, the range is split
            into the stream's windows, each resumable on its own.
        end: Backfill: the instant to stop at (exclusive).
        backfill_id: Backfill: id under which its windows are checkpointed. Default: derived
            from stream and range, so running the same backfill again resumes it.
        fan_out: Where partitions run: "threads" (in this flow run) or "deployment" (child
            flow runs of the partition deployment on a work pool). Default: the stream's
            `fan_out:`.
    """
    hooks = _HOOKS.get() or RunHooks()
    cfg = resolve_secret_blocks(hooks.config or load_config(config))
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    spec = cfg.stream(stream)
    mode = fan_out or spec.fan_out
    if mode not in ("threads", "deployment"):
        raise ConfigError(f"stream {stream}: fan_out: {mode!r} is not threads or deployment",
                          key=f"streams.{stream}.fan_out")  # fmt: skip
    backfill = start is not None or end is not None
    parent = (
        spec.partitions.stream if spec.partitions and spec.partitions.type == "parent" else None
    )
    if parent and not backfill:
        # The parent is read through its own flow and checkpoints first.
        flow_for(parent, _concurrency(cfg, parent))(stream=parent, config=config)
    scope = backfill_scope(stream, start, end, backfill_id) if backfill else ""
    run = StreamRun(
        cfg, stream, flow_run_id=flow_run_id, full_refresh=full_refresh, scope=scope,
        observers=[*hooks.observers, ProgressArtifacts(stream, scope)], stop=hooks.stop,
    )  # fmt: skip
    try:
        specs = run.prepare(start=start, end=end) if backfill else run.prepare()
        if mode == "deployment":
            outcomes, errors, links = _fan_out(run, specs, cfg, config, full_refresh)
        else:
            outcomes, errors, links = run_in_threads(run, specs, stream)
        # replace: the refresh's tables go live only once every partition is complete.
        replaced = not errors and run.swap()
    finally:
        run.close()
    _summary_artifact(stream, scope, outcomes, links)
    if errors:
        raise ExceptionGroup(
            f"stream {stream}: {len(errors)} of {len(outcomes)} partitions failed", errors
        )
    return {
        "stream": stream,
        "scope": scope,
        "partitions": len(outcomes),
        "complete": sum(o.status == "complete" for o in outcomes),
        "pages": sum(o.new_pages for o in outcomes),
        "records": sum(o.new_records for o in outcomes),
        "replaced": replaced,
    }


Ran = tuple[list[PartitionOutcome], list[Exception], dict[str, str]]


def run_in_threads(run: StreamRun, specs: list[PartitionSpec], stream: str) -> Ran:
    """Every partition a task of this flow run, in its thread pool (a stream's flow run,
    or a child flow run of `fan_out: deployment` with its batch)."""
    partition = tagged(stream)
    futures = [partition.submit(run, s, stream, s.key) for s in specs]
    try:
        wait(futures)
    except BaseException as exc:
        _stop_partitions(run, exc, futures)
        raise
    outcomes: list[PartitionOutcome] = []
    errors: list[Exception] = []
    links = {s.key: _task_run_link(str(f.task_run_id)) for s, f in zip(specs, futures, strict=True)}
    for s, fut in zip(specs, futures, strict=True):
        if fut.state.is_completed():
            outcomes.append(fut.result())
        else:
            exc = fut.result(raise_on_failure=False)
            errors.append(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            outcomes.append(PartitionOutcome(s.key, "incomplete", error=str(exc)))
    return outcomes, errors, links


def _stop_partitions(run: StreamRun, exc: BaseException, futures: list[Any]) -> None:
    """The flow run is told to end while its partitions run: Prefect raises its
    TerminationSignal in the flow on SIGTERM (a Cancel in the UI, a worker or `pagesync up`
    that stops). As the CLI does on SIGTERM, every partition ends after its page in
    progress (requests still in flight after `ABORT_AFTER` are aborted), and the flow run
    ends once they have, or after `STOP_GRACE`: before its store and client are closed."""
    number = getattr(exc, "signal", None)
    reason = signal.Signals(number).name if isinstance(number, int) else type(exc).__name__
    run.stop.request(reason, abort_after=ABORT_AFTER)
    wait(futures, timeout=STOP_GRACE)


def _fan_out(
    run: StreamRun, specs: list[PartitionSpec], cfg: Config, config: str | None,
    full_refresh: bool,
) -> Ran:  # fmt: skip
    """Every partition in child flow runs of the partition deployment (flows/fanout.py)."""
    from .fanout import FanOut, PartitionFailed, config_path_of, flow_run_link

    fan = FanOut(run, config_path_of(cfg, config, run.name), full_refresh=full_refresh)
    outcomes, ran_in = fan(specs)
    errors: list[Exception] = []
    for o in outcomes:
        if o.status != "complete":
            errors.append(PartitionFailed(f"stream {run.name} partition {o.partition}: {o.error}"))
        for obs in run.observers:
            try:
                obs.partition_done(run.name, o)
            except Exception:  # display only
                logging.getLogger("pagesync").exception("progress observer %r failed", obs)
    return outcomes, errors, {k: flow_run_link(v) for k, v in ran_in.items()}


def _summary_artifact(
    stream: str, scope: str, outcomes: list[PartitionOutcome], links: dict[str, str]
) -> None:
    """One table per flow run: what each partition did in it, each row linked to the
    partition's task run (its pages and log lines are there)."""
    table = [
        {
            "partition": o.partition,
            "task run": links.get(o.partition, ""),
            "status": "complete (skipped)" if o.skipped else o.status,
            "pages": o.pages,
            "records": o.records,
            "pages this run": o.new_pages,
            "records this run": o.new_records,
            "rejected": o.rejected,
            "first cursor": "" if o.first_cursor is None else str(o.first_cursor),
            "last cursor": "" if o.last_cursor is None else str(o.last_cursor),
            "resumed from": o.resumed_from or "",
            "taken over": o.taken_over or "",
            "error": o.error or "",
        }
        for o in outcomes
    ]
    key = artifact_key("pagesync", stream, "partitions")
    of = f" ({scope_label(stream, scope)})" if scope else ""
    create_table_artifact(
        table,
        key=key,
        description=(
            f"Partitions of stream **{stream}**{of} in this flow run: status, pages and "
            "records (the partition's totals and this run's), cursors, where each resumed "
            "from, and a link to each partition's task run"
        ),
    )


def _task_run_link(task_run_id: str | None) -> str:
    """A markdown link to the task run's page in the UI; its id when no UI is known."""
    if task_run_id is None:
        return ""
    url = url_for("task-run", obj_id=task_run_id)
    return f"[{task_run_id}]({url})" if url else task_run_id


def _concurrency(cfg: Config, stream: str) -> int:
    return cfg.sources[cfg.streams[stream].source].concurrency


def flow_for(stream: str, concurrency: int = 4, **options: Any) -> StreamFlow:
    """The stream's own flow: named after it, with as many partitions in flight as allowed,
    and any other of `Flow.with_options`'s `options` (one copy: each makes the parameter
    schema anew, 6 to 15 ms)."""
    return sync_stream.with_options(
        name=stream,
        flow_run_name=stream,
        task_runner=ThreadPoolTaskRunner(max_workers=concurrency),
        **options,
    )
