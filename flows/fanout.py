"""`fan_out: deployment`: a stream's partitions in child flow runs on a work pool's workers.

The stream's flow run becomes a coordinator. It plans the partitions as the threads path
does, then submits them in batches as flow runs of one deployment, `pagesync-partitions/
partitions` (`run_deployment(..., timeout=0, as_subflow=True)`), which any worker of its
pool takes: process, Docker or Kubernetes. A child runs its partitions with the same
partition task as the threads path (a task run per partition, a task run per page, a
checkpoint per page); the checkpoint store is the only state the runs share.

The coordinator then waits on the store and on its children's states. A child that ends
(Completed, Failed, Crashed, Cancelled) with partitions it never finished has them
submitted again, up to `RESUBMITS` times; each resumes from its committed page. A child
whose worker died with it (SIGKILL, a lost machine) stays Running in Prefect: once it has
held no live lease for a lease TTL plus `STARTUP_GRACE`, the coordinator marks it Crashed
and submits its partitions again. A new child waits for a dead runner's lease to expire
(at once on the same host: its process is gone), so the TTL bounds the takeover.

Cancelling the coordinator cancels its children: they are its subflows, which Prefect's
server cancels with their parent; the coordinator also asks it itself when it is stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling, Completed, Crashed, Failed
from prefect.utilities.urls import url_for

from pagesync.core.config import Config, load_config
from pagesync.core.engine import PartitionOutcome, StreamRun
from pagesync.core.errors import ConfigError, PagesyncError, Stopped
from pagesync.core.partitions import PartitionSpec
from pagesync.core.store import COMPLETE, INCOMPLETE
from pagesync.prefect.ratelimit import SharedRateLimiter, ensure_limit
from pagesync.tasks.progress import ProgressArtifacts

from .secrets import resolve_secret_blocks
from .stream import run_in_threads

FLOW_NAME = "pagesync-partitions"
DEPLOYMENT = "partitions"
#: Times a partition whose child run ended before it did is submitted again.
RESUBMITS = 3
#: Seconds a Running child may go without a live lease before it counts as dead: the time
#: from its Running state to its first lease (config, imports of user code, the store).
STARTUP_GRACE = 10.0
#: The same for a child still Pending: its worker is starting its process (or died).
PENDING_GRACE = 30.0
POLL = 1.0

log = logging.getLogger("pagesync")


class PartitionFailed(PagesyncError):
    """A partition of a child flow run ended incomplete; its message is the stored error."""


@flow(name=FLOW_NAME, persist_result=False, log_prints=False)
def run_partitions(
    stream: str,
    partitions: list[dict[str, Any]],
    config: str | None = None,
    scope: str = "",
    full_refresh: bool = False,
    refresh: str | None = None,
) -> dict[str, Any]:
    """Run a batch of a stream's partitions, each a task with a task run per page.

    Args:
        stream: Name of the stream in the config file.
        partitions: The partitions, as the coordinator planned them.
        config: Path of pagesync.yaml (default: $PAGESYNC_CONFIG, else ./pagesync.yaml).
        scope: The backfill id the partitions are checkpointed under ("" otherwise).
        full_refresh: Walk the partitions from their start, complete or not.
        refresh: A replace stream's refresh, chosen by the coordinator: the partitions
            write into its staging table.
    """
    cfg = resolve_secret_blocks(load_config(config))
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    specs = [PartitionSpec(**p) for p in partitions]
    source = cfg.sources[cfg.stream(stream).source]
    limiter = (
        SharedRateLimiter(cfg.stream(stream).source, source.rate_limit.per_second)
        if source.rate_limit
        else None
    )
    run = StreamRun(
        cfg, stream, flow_run_id=flow_run_id, full_refresh=full_refresh, scope=scope,
        observers=[ProgressArtifacts(stream, scope)], limiter=limiter,
    )  # fmt: skip
    run.refresh = refresh
    try:
        run.store.migrate()
        _, errors, _ = run_in_threads(run, specs, stream)
    finally:
        run.close()
    if errors:
        raise ExceptionGroup(f"stream {stream}: {len(errors)} of {len(specs)} failed", errors)
    return {"stream": stream, "partitions": len(specs)}


def deployment_name() -> str:
    return f"{FLOW_NAME}/{DEPLOYMENT}"


@dataclass
class _Child:
    """One submitted child flow run and the partitions it was given."""

    id: UUID
    keys: list[str]
    #: Monotonic time it was last seen alive (not yet Running, or holding a live lease).
    alive_at: float
    state: str = "SCHEDULED"
    final: bool = False
    crashed_by_us: bool = False
    message: str = ""


@dataclass
class FanOut:
    """The coordinator's side of `fan_out: deployment` for one stream run."""

    run: StreamRun
    config_path: str
    full_refresh: bool = False
    children: list[_Child] = field(default_factory=list)
    #: Per partition: the row's version when last submitted (a settled row has moved past).
    submitted: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    given_up: dict[str, str] = field(default_factory=dict)

    def __call__(self, specs: list[PartitionSpec]) -> tuple[list[PartitionOutcome], dict[str, str]]:
        """Run every partition in child flow runs; their outcomes, and a link per partition
        to the child flow run that last ran it."""
        run = self.run
        by_key = {s.key: s for s in specs}
        rows = self._rows()
        at_start = {k: (rows[k]["pages"], rows[k]["records"]) for k in by_key}
        todo = [s for s in specs if self.full_refresh or not self._skips(s, rows[s.key])]
        batch = min(run.stream.fan_out_batch, run.source.concurrency)
        ran_in: dict[str, str] = {}
        if run.source.rate_limit is not None:
            ensure_limit(run.stream.source, run.source.rate_limit.per_second)
        try:
            with get_client(sync_client=True) as client:
                for i in range(0, len(todo), batch):
                    self._submit(todo[i : i + batch], rows, full_refresh=self.full_refresh)
                while True:
                    retry, rows = self._watch(client)
                    for keys in retry:
                        self._submit([by_key[k] for k in keys], rows, full_refresh=False)
                    if all(c.final for c in self.children):
                        break
                    if run.stop.is_set():  # SIGTERM or Ctrl-C of the coordinator
                        raise Stopped(
                            f"{run.stop.said}; the child flow runs are cancelled, committed "
                            "pages are kept"
                        )
                    time.sleep(POLL)
                for child in self.children:
                    if child.crashed_by_us:
                        self._crash_task_runs(client, child)
                for child in self.children:
                    for k in child.keys:
                        ran_in[k] = str(child.id)
        except BaseException:
            self._cancel_children()
            raise
        rows = self._rows()
        outcomes = [self._outcome(s, rows[s.key], at_start[s.key], s in todo) for s in specs]
        return outcomes, ran_in

    # -- submitting -----------------------------------------------------------------------

    def _submit(
        self, specs: list[PartitionSpec], rows: dict[str, Any], *, full_refresh: bool
    ) -> None:
        run = self.run
        keys = [s.key for s in specs]
        for k in keys:
            self.submitted[k] = rows[k]["version"]
            self.attempts[k] = self.attempts.get(k, 0) + 1
        label = keys[0] if len(keys) == 1 else f"{keys[0]} … {keys[-1]}"
        child = run_deployment(
            deployment_name(),
            parameters={
                "stream": run.name, "partitions": [asdict(s) for s in specs],
                "config": self.config_path, "scope": run.scope, "full_refresh": full_refresh,
                "refresh": run.refresh,
            },
            flow_run_name=f"{run.name} · {label}",
            tags=["pagesync", f"stream:{run.name}"],
            timeout=0,
            as_subflow=True,
        )  # fmt: skip
        self.children.append(_Child(child.id, keys, time.monotonic()))

    # -- watching -------------------------------------------------------------------------

    def _rows(self, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
        run = self.run
        return {r["partition"]: r for r in run.store.partitions(run.name, run.scope, keys)}

    def _settled(self, row: dict[str, Any]) -> bool:
        """Finished (complete, or incomplete with its error) since it was last submitted."""
        k = row["partition"]
        return row["status"] in (COMPLETE, INCOMPLETE) and row["version"] > self.submitted[k]

    def _watch(self, client: Any) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
        """Update the children's states; the batches of partitions to submit again, and the
        partition rows read for it.

        The rows are read after the children's states: a partition's row is final before
        its child flow run is, so a child seen ended has its partitions' last word in them
        (read the other way round, a partition that failed in between looks unfinished and
        would be submitted again)."""
        active = [c for c in self.children if not c.final]
        if not active:
            return [], {}
        runs: list[FlowRun] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[c.id for c in active]))
        )
        # Only the partitions in flight: a stream of thousands is polled every POLL seconds.
        rows = self._rows(sorted({k for c in active for k in c.keys}))
        by_id = {r.id: r for r in runs}
        now, mono = time.time(), time.monotonic()
        ttl = self.run.source.lease_ttl
        again: list[list[str]] = []
        for child in active:
            fr = by_id.get(child.id)
            state = fr.state if fr else None
            child.state = state.type.value if state else "UNKNOWN"
            child.message = (state.message or "") if state else ""
            if state is None or not state.is_final():
                owned = f":{child.id}"
                holds = any(
                    (rows[k]["lease_owner"] or "").endswith(owned)
                    and (rows[k]["lease_expires"] or 0) > now
                    for k in child.keys
                )
                starting = state is not None and state.is_pending()
                if holds or not (starting or (state and state.is_running())):
                    child.alive_at = mono  # holding leases, or Scheduled: waits for a worker
                    continue
                grace = ttl + (PENDING_GRACE if starting else STARTUP_GRACE)
                if mono - child.alive_at < grace:
                    continue
                self._crash(client, child, f"no live lease for {grace:g} s")
            child.final = True
            self._settle_parent_task_run(client, fr, child)
            left = [k for k in child.keys if not self._settled(rows[k]) and k not in self.given_up]
            # Partitions given to a later child since are that child's concern.
            left = [k for k in left if self._last_child(k) is child]
            retry = []
            for k in left:
                if self.attempts[k] > RESUBMITS:
                    why = f": {child.message}" if child.message else ""
                    self.given_up[k] = (
                        f"its flow run ended {child.state} {self.attempts[k]} times before "
                        f"the partition did (last {child.id}{why})"
                    )
                else:
                    retry.append(k)
            if retry:
                log.warning(
                    "stream %s: child flow run %s ended %s before partitions %s finished; "
                    "submitting them again (they resume from their committed page)",
                    self.run.name, child.id, child.state, ", ".join(retry),
                )  # fmt: skip
                again.append(retry)
        return again, rows

    def _last_child(self, key: str) -> _Child | None:
        return next((c for c in reversed(self.children) if key in c.keys), None)

    def _crash(self, client: Any, child: _Child, why: str) -> None:
        """Mark a child whose process died Crashed: nothing else would end it."""
        message = f"pagesync: its runner is gone ({why}); its partitions are submitted again"
        try:
            client.set_flow_run_state(child.id, Crashed(message=message), force=True)
            child.state = "CRASHED"
            child.crashed_by_us = True
            self._crash_task_runs(client, child)
        except Exception:
            log.warning("marking flow run %s Crashed failed", child.id, exc_info=True)

    def _crash_task_runs(self, client: Any, child: _Child) -> None:
        """Its task runs were Running in the dead process: they crashed with it. Done again
        when the run ends, for state changes the server recorded late (they are events)."""
        left = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])),
            task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(
                    type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                )
            ),
        )
        for tr in left:
            client.set_task_run_state(
                tr.id, Crashed(message="pagesync: its flow run's process is gone"), force=True
            )

    def _settle_parent_task_run(self, client: Any, fr: FlowRun | None, child: _Child) -> None:
        """The task run that stands for the child in this flow run (run_deployment makes it
        Pending, and nothing moves it on) ends as the child did."""
        if fr is None or fr.parent_task_run_id is None:
            return
        state = {
            "COMPLETED": Completed, "FAILED": Failed, "CANCELLED": Cancelled,
        }.get(child.state, Crashed)(message=f"flow run {child.id} ended {child.state}")  # fmt: skip
        try:
            client.set_task_run_state(fr.parent_task_run_id, state, force=True)
        except Exception:
            log.debug("settling the task run of flow run %s failed", child.id, exc_info=True)

    def _cancel_children(self) -> None:
        """The coordinator is stopped or cancelled: so are its children still running."""
        active = [c for c in self.children if not c.final]
        if not active:
            return
        try:
            with get_client(sync_client=True) as client:
                for child in active:
                    client.set_flow_run_state(
                        child.id, Cancelling(message="the stream's flow run ended"), force=True
                    )
        except Exception:
            log.warning("cancelling child flow runs failed", exc_info=True)

    # -- results --------------------------------------------------------------------------

    def _skips(self, spec: PartitionSpec, row: dict[str, Any]) -> bool:
        """Complete and not reopened: not worth a child run (retries land here)."""
        return self.run.settled(spec, row["status"], row["state"])

    def _outcome(
        self, spec: PartitionSpec, row: dict[str, Any], start: tuple[int, int], ran: bool
    ) -> PartitionOutcome:
        st = row["state"]
        status = COMPLETE if row["status"] == COMPLETE else INCOMPLETE
        error = self.given_up.get(spec.key) or (row["error"] if status != COMPLETE else None)
        if status != COMPLETE and not error:
            error = "not finished"
        return PartitionOutcome(
            spec.key, status, pages=row["pages"], records=row["records"],
            first_cursor=st.get("first_cursor"), last_cursor=st.get("cursor"),
            error=error, skipped=not ran, new_pages=row["pages"] - start[0],
            new_records=row["records"] - start[1], rejected=st.get("rejected", 0),
        )  # fmt: skip


def config_path_of(cfg: Config, config: str | None, stream: str) -> str:
    """The path children load the config from: a file, since they run elsewhere."""
    if config:
        return config
    if cfg.path is None:
        raise ConfigError(
            "fan_out: deployment needs a config read from a file (child flow runs load it)",
            key=f"streams.{stream}.fan_out",
        )
    return str(cfg.path)


def flow_run_link(flow_run_id: str | None) -> str:
    if flow_run_id is None:
        return ""
    url = url_for("flow-run", obj_id=flow_run_id)
    return f"[{flow_run_id}]({url})" if url else flow_run_id


__all__ = ["FanOut", "PartitionFailed", "run_partitions", "deployment_name", "load_config"]
