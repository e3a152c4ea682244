"""The partition task: a Prefect task per partition, with its pages' task runs under it.

All the work is the engine's (`pagesync.core.engine`); the partition task walks the partition
and gives each page a task run of its own (`pages.PageTaskRuns`), named
`stream · partition · page N`, retried on transient errors. No record passes through
Prefect: a page returns counts, never rows.

The partition's task run logs two lines at INFO, where it starts (fresh, resumed from
which page and cursor, skipped) and how it ends (pages, records, rejected, time); the
pages' own story is in their task runs' state messages, not in the logs.

Tags (`stream:NAME`) go on the partition task only: in Prefect 3.9 every task run with
tags acquires a concurrency slot through the API before it starts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pagesync.core.engine import PartitionOutcome, PartitionRun, StreamRun, run_partition
from pagesync.core.partitions import PartitionSpec

from .messages import partition_ended, partition_started
from .pages import PageTaskRuns
from .progress import ProgressArtifacts

#: The partition's log lines go to a child of Prefect's task-run logger (to the task run's
#: logs in the API, with its run ids), at the level of Prefect's own loggers: the CLI turns
#: `prefect.task_runs` down to WARNING to drop Prefect's per-task lines (settings.py).
STORY = "pagesync"


@task(
    name="partition",
    task_run_name="{stream} · {partition}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def partition_task(
    run: StreamRun, spec: PartitionSpec, stream: str, partition: str
) -> PartitionOutcome:
    """Walk one partition from its resume point to its end, a task run per page."""
    began = time.monotonic()
    story = _story()
    pages = PageTaskRuns(stream, partition, retries=run.source.retry.task_retries)
    part = run.partition(spec)
    for obs in run.observers:
        if isinstance(obs, ProgressArtifacts):
            obs.start(spec)

    def started(part: PartitionRun, opened: bool) -> None:
        lease = part.lease
        if not opened or lease is None:
            story.info("%s · %s: skipped: complete", stream, partition)
            return
        line = partition_started(
            part.outcome.resumed_from, part.next_page, lease.pages, lease.records,
            lease.state.get("resume"),
        )  # fmt: skip
        if part.outcome.taken_over:
            line += f"; left running by a runner that is gone ({part.outcome.taken_over})"
        story.info("%s · %s: %s", stream, partition, line)

    def ended() -> None:
        outcome, lease = part.outcome, part.lease
        if outcome.skipped:
            return
        resumes_at = int(lease.state.get("page", 0)) + 1 if lease else None
        line = partition_ended(outcome, time.monotonic() - began, resumes_at)
        story.info("%s · %s: %s", stream, partition, line)

    try:
        outcome = run_partition(part, pages, started)
    except BaseException:
        ended()
        raise
    finally:
        pages.flush()  # the pages' task runs reach the server before the partition's end
    ended()
    return outcome


def _story() -> Any:
    """The partition task run's logger for its story (see STORY)."""
    log = get_run_logger().getChild(STORY)  # type: ignore[union-attr]
    if log.logger.level == logging.NOTSET:  # unless configured: Prefect's own level
        log.logger.setLevel(logging.getLogger("prefect").getEffectiveLevel())
    return log


def tagged(stream: str) -> Task[..., PartitionOutcome]:
    """The partition task with the stream's tag, for the dashboard's filters.

    One tag set for all partitions of a stream: Prefect acquires a concurrency slot for
    every tagged task run through a client-side service per distinct tag set, and a tag per
    partition made partitions start seconds apart (measured: 8 partitions, 42 s instead of
    12 s). The partition is in the run's name instead; page tasks carry no tag at all.
    """
    return partition_task.with_options(tags={f"stream:{stream}"})
