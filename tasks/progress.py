"""Prefect progress artifacts: one per partition, kept up to date while it runs.

A progress artifact holds a percentage; pages and records so far go in its description.
Updates are API calls, so they are throttled (at most one per partition every few
seconds, plus the final one): the dashboard stays current without a call per page. The
periodic ones are made by a thread of their own, not by the page that was just committed
(each is a new API client and a request: 50 to 70 ms on the measured machine, in the way
of the next page); the final one waits for them, so it is always the last word.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from pagesync.core.engine import PartitionOutcome
from pagesync.core.partitions import PartitionSpec

EVERY_SECONDS = 2.0

log = logging.getLogger("pagesync.cli.progress")


def artifact_key(*parts: str) -> str:
    """Prefect wants keys of lowercase letters, digits and dashes; runs of dashes are
    folded, so a key stays short enough to read in the run graph."""
    raw = "-".join(p for p in parts if p).lower()
    key = "".join(c if c.isalnum() and c.isascii() else "-" for c in raw)
    while "--" in key:
        key = key.replace("--", "-")
    return key.strip("-")[:200]


def progress_key(stream: str, partition: str) -> str:
    """A partition's progress artifact key: stream and partition, stable across runs (each
    run of the partition is a new version of the same artifact)."""
    return artifact_key("pagesync", stream, partition)


def scope_label(stream: str, scope: str) -> str:
    """A run's scope for people: `backfill 2024-01-01T00:00:00Z..2024-01-05T00:00:00Z`
    (the stream's name, which the default backfill id repeats, left out)."""
    return scope.replace(f"backfill {stream} ", "backfill ", 1)


def describe(stream: str, partition: str, scope: str, status: str) -> str:
    """A progress artifact's description: what it tracks, then where the partition is."""
    of = f" ({scope_label(stream, scope)})" if scope else ""
    return f"Progress of partition **{partition}** of stream **{stream}**{of}: {status}"


def _fraction(spec: PartitionSpec, cursor: object) -> float | None:
    """How far through a datetime window the cursor is, when that can be known."""
    if not (spec.window_start and spec.window_end and isinstance(cursor, str)):
        return None
    try:
        lo, hi = (
            datetime.fromisoformat(v.replace("Z", "+00:00"))
            for v in (spec.window_start, spec.window_end)
        )
        at = datetime.fromisoformat(cursor.replace("Z", "+00:00"))
    except ValueError:
        return None
    span = (hi - lo).total_seconds()
    return None if span <= 0 else min(max((at - lo).total_seconds() / span, 0.0), 0.99)


class ProgressArtifacts:
    """An engine Observer: a progress artifact per partition of one stream run."""

    def __init__(self, stream: str, scope: str = "") -> None:
        self.stream = stream
        self.scope = scope
        self.lock = threading.Lock()
        #: Each partition's artifact, as its creation on the updater thread: updates are
        #: queued behind it there, and wait for its id.
        self.ids: dict[str, tuple[Future[UUID | None], PartitionSpec]] = {}
        self.last: dict[str, float] = {}
        self.pending: dict[str, Future[None]] = {}  # each partition's periodic update
        self.updater: ThreadPoolExecutor | None = None

    def start(self, spec: PartitionSpec) -> None:
        """Create the partition's artifact (in its task run's context, so the UI links
        them), on the updater thread: the first page need not wait for the API."""
        with self.lock:
            created = self._in_background(
                "creation",
                create_progress_artifact,
                0.0,
                key=progress_key(self.stream, spec.key),
                description=describe(self.stream, spec.key, self.scope, "starting"),
            )
            self.ids[spec.key] = (created, spec)
            self.last[spec.key] = time.monotonic()

    def page_committed(self, stream: str, progress: PartitionOutcome) -> None:
        partition = progress.partition
        with self.lock:
            entry = self.ids.get(partition)
            now = time.monotonic()
            if entry is None or now - self.last.get(partition, 0.0) < EVERY_SECONDS:
                return
            before = self.pending.get(partition)
            if before is not None and not before.done():
                return  # the API is slower than the pages: skip, never queue up
            self.last[partition] = now
            created, spec = entry
            fraction = _fraction(spec, progress.last_cursor)
            self.pending[partition] = self._in_background(
                "update",
                _update,
                created,
                0.0 if fraction is None else round(fraction * 100, 1),
                description=describe(
                    stream,
                    partition,
                    self.scope,
                    f"{progress.pages:,} pages, {progress.records:,} records so far "
                    f"({progress.new_pages:,} pages in this run)",
                ),  # fmt: skip
            )

    def _in_background(
        self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Future[Any]:
        """Run `fn` on the updater thread, in this thread's context (Prefect's settings,
        client and task run are context variables); a failure is logged, as the engine
        logs a failing observer, and gives None."""
        if self.updater is None:
            self.updater = ThreadPoolExecutor(1, thread_name_prefix="pagesync-progress")
        context = contextvars.copy_context()

        def call() -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception:
                log.exception("progress artifact %s failed", what)
                return None

        return self.updater.submit(context.run, call)

    def partition_done(self, stream: str, outcome: PartitionOutcome) -> None:
        entry = self.ids.get(outcome.partition)
        if entry is None:
            return
        with self.lock:
            before = self.pending.pop(outcome.partition, None)
        if before is not None:
            before.result()  # the final update after the periodic one, not before it
        done = outcome.status == "complete"
        _update(
            entry[0],
            100.0 if done else 0.0,
            description=describe(
                stream,
                outcome.partition,
                self.scope,
                f"{outcome.status}, {outcome.pages:,} pages, {outcome.records:,} records"
                + (f"; {outcome.error}" if outcome.error else ""),
            ),  # fmt: skip
        )


def _update(created: Future[UUID | None], progress: float, description: str) -> None:
    """Update the artifact once it exists (not at all if its creation failed)."""
    artifact_id = created.result()
    if artifact_id is not None:
        update_progress_artifact(artifact_id, progress, description=description)
