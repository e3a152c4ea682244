"""The stream flow: plan partitions, run them concurrently, report every error at the end."""

from __future__ import annotations

from typing import Any

from pagesync.tasks import tagged
from prefect import Flow, flow
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from pagesync.config import load_config
from pagesync.engine import Observer, PartitionOutcome, StreamRun
from pagesync.errors import PagesyncError

#: Observers told of progress by runs in this process (the CLI's live display).
OBSERVERS: list[Observer] = []


class StreamFailed(PagesyncError):
    """Some partitions of a stream failed; carries every one of their errors."""


@flow(name="pagesync", persist_result=False, log_prints=False)
def sync_stream(
    stream: str,
    config: str | None = None,
    full_refresh: bool = False,
) -> dict[str, Any]:
    """Sync one stream: each partition a task, each page a retried, checkpointed subtask."""
    cfg = load_config(config)
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    spec = cfg.stream(stream)
    if spec.partitions is not None and spec.partitions.type == "parent":
        # The parent is read through its own flow and checkpoints first.
        flow_for(
            spec.partitions.stream,
            cfg.sources[cfg.streams[spec.partitions.stream].source].concurrency,
        )(stream=spec.partitions.stream, config=config)
    run = StreamRun(
        cfg, stream, flow_run_id=flow_run_id, full_refresh=full_refresh, observers=list(OBSERVERS)
    )
    try:
        specs = run.prepare()
        futures = [tagged(stream, s.key).submit(run, s, stream, s.key) for s in specs]
        wait(futures)
        outcomes: list[PartitionOutcome] = []
        errors: list[Exception] = []
        for s, fut in zip(specs, futures, strict=True):
            state = fut.state
            if state.is_completed():
                outcomes.append(fut.result())
            else:
                exc = fut.result(raise_on_failure=False)
                errors.append(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                outcomes.append(PartitionOutcome(s.key, "incomplete", error=str(exc)))
    finally:
        run.close()
    summary = {
        "stream": stream,
        "partitions": len(outcomes),
        "complete": sum(o.status == "complete" for o in outcomes),
        "pages": sum(o.pages for o in outcomes),
        "records": sum(o.records for o in outcomes),
    }
    if errors:
        raise ExceptionGroup(
            f"stream {stream}: {len(errors)} of {len(outcomes)} partitions failed", errors
        )
    return summary


def flow_for(stream: str, concurrency: int = 4) -> Flow[..., dict[str, Any]]:
    """The stream's own flow: named after it, with as many partitions in flight as allowed."""
    return sync_stream.with_options(
        name=stream,
        flow_run_name=f"{stream}",
        task_runner=ThreadPoolTaskRunner(max_workers=concurrency),
    )
