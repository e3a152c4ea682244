"""Run a stream's flow from the command line, for people.

Prefect's console output is turned down (the CLI draws its own progress); its logs still
reach the API, so the UI shows everything, tracebacks included. Works with no Prefect
settings at all: a local server is found or started, with a generous startup timeout.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from ..core.config import Config
from ..core.engine import ABORT_AFTER, PartitionOutcome, Stop
from ..core.store import warm_engines
from ..prefect import local_server
from ..prefect.settings import configure


@dataclass
class RunReport:
    """What a run did, for the summary line and the exit code."""

    stream: str
    ok: bool
    outcomes: list[PartitionOutcome] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    flow_run_id: str | None = None
    #: The signal that stopped the run (SIGTERM, SIGINT), if one did.
    signal: int | None = None


class _Collector:
    def __init__(self) -> None:
        self.outcomes: list[PartitionOutcome] = []

    def page_committed(self, stream: str, progress: PartitionOutcome) -> None:
        pass

    def partition_done(self, stream: str, outcome: PartitionOutcome) -> None:
        self.outcomes.append(outcome)


def quiet_prefect(verbose: bool) -> None:
    """Before Prefect is imported: the CLI draws its own output, so Prefect's console handler
    stays silent unless --verbose (its logs still go to the API and the UI)."""
    configure()
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO" if verbose else "CRITICAL"


#: Container allocations between two young-generation collections (Python's default: 700).
GC_THRESHOLD = 10_000


def quiet_gc() -> None:
    """Keep the garbage collector out of the page loop.

    Its oldest generation held everything Prefect is made of, and each full collection
    walked all of it; what is imported by now lives as long as the process, so it is
    frozen out of the scans. A 1,000-record page is thousands of live containers at once,
    so at Python's threshold every page also set off a few young collections, each walking
    the page's records. Records are freed
    by reference counting; so are the pages' responses, once out of their reference cycle
    (`http._unlinked`), without which this threshold let 25 MB of them pile up in a
    1,000,000-record sync. Garbage cycles are still collected, only less often.

    The collector is off while the CLI imports (`pagesync.cli.main`, and the flows above):
    imports make long-lived objects, not garbage, so its collections then free nothing
    and only slow the start.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    gc.enable()


def flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in flatten(sub)]
    return [exc]


def run_stream(
    config: Config,
    stream: str,
    *,
    console: Console,
    verbose: bool = False,
    observers: list[Any] | None = None,
    **params: Any,
) -> RunReport:
    """Run the stream's flow in this process and report how it went (never raises for
    partition failures: those are in the report)."""
    quiet_prefect(verbose)
    server = local_server.start_if_needed()  # starts while Prefect is imported below
    if server is not None:
        console.print(f"[dim]{server_note(server)}[/dim]", highlight=False)
    gc.disable()  # until quiet_gc: importing allocates a lot and frees next to nothing
    try:
        from pagesync.flows.stream import RunHooks, flow_for, run_hooks  # imports Prefect
    finally:
        quiet_gc()

    if server is not None:
        server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        try:
            local_server.crash_orphaned_runs()
        except Exception:  # bookkeeping of earlier runs never stops this one
            logging.getLogger("pagesync").debug("marking killed runs Crashed", exc_info=True)

    collector = _Collector()
    hooks = RunHooks(observers=[collector, *(observers or [])], stop=Stop())
    handler = _PeopleHandler(console)
    logging.getLogger("pagesync").addHandler(handler)
    stopped: list[int] = []
    previous = _install_stop_handlers(console, hooks.stop, stopped)
    try:
        source = config.sources[config.stream(stream).source]
        # On the kept server, nothing else would end this run's flow runs should this
        # process be killed: the next run marks them Crashed.
        kept = server is not None and server.idle
        flow = flow_for(stream, source.concurrency, on_running=[_note_flow_run] if kept else None)

        # The store's engines are made while Prefect creates the flow run.
        warm_engines(config.state, config.destination_url)

        def call() -> Any:
            with run_hooks(hooks):
                return _run_flow(
                    flow,
                    local=server is not None,
                    stream=stream,
                    config=str(config.path) if config.path else None,
                    return_state=True,
                    **params,
                )

        state = _in_thread(call)
    finally:
        logging.getLogger("pagesync").removeHandler(handler)
        for signum, old in previous.items():
            signal.signal(signum, old)
    report = RunReport(stream, ok=state.is_completed() and not stopped, outcomes=collector.outcomes)
    report.signal = stopped[0] if stopped else None
    report.flow_run_id = str(state.state_details.flow_run_id) if state.state_details else None
    if not report.ok:
        exc = state.result(raise_on_failure=False)
        report.errors = flatten(exc) if isinstance(exc, BaseException) else [RuntimeError(str(exc))]
    return report


def _note_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    local_server.note_flow_run(str(flow_run.id))


def server_note(server: local_server.LocalServer) -> str:
    """One line on the Prefect server a run uses, when pagesync chose it."""
    if server.idle == 0:
        return (
            "No PREFECT_API_URL: using a local Prefect server for this run "
            "(its first start on a machine can take a minute)."
        )
    idle = f"{server.idle:g} s" if server.idle < 120 else f"{server.idle / 60:g} min"
    kept = f"kept {idle} after the last run; `pagesync server stop` ends it"
    if server.reused:
        return f"No PREFECT_API_URL: using the local Prefect server at {server.api_url} ({kept})."
    return (
        f"No PREFECT_API_URL: starting a local Prefect server ({kept}; its first start on a "
        "machine can take a minute)."
    )


def _run_flow(flow: Any, *, local: bool, **kwargs: Any) -> Any:
    """Call the flow; on our local server, without flow-run heartbeats, version checks or
    CSRF tokens.

    Heartbeats let a server notice a run whose process died, through an automation; the
    local server runs no automations, so they are of no use there, and stopping their
    thread costs up to a second at the end of every run. Each Prefect client asks the
    server's version once (the async one through a new TLS context, 20 to 40 ms before
    the first page), and a CSRF token before its first change: the local server runs this
    very Prefect and asks for no token (`LocalServer.find`, `SERVER_ENV`).
    """
    if not local:
        return flow(**kwargs)
    from prefect.context import SettingsContext, get_settings_context

    # A copy of the settings with one field changed, not `temporary_settings`, which
    # validates all of them again (20 ms of a 500 ms run, measured).
    ctx = get_settings_context()
    flows = ctx.settings.flows.model_copy(update={"heartbeat_frequency": None})
    client = ctx.settings.client.model_copy(
        update={"server_version_check_enabled": False, "csrf_support_enabled": False}
    )
    settings = ctx.settings.model_copy(update={"flows": flows, "client": client})
    with SettingsContext(profile=ctx.profile, settings=settings):
        return flow(**kwargs)


def _in_thread(fn: Any) -> Any:
    """Run the flow off the main thread, so that the main thread keeps our SIGTERM and
    SIGINT handlers (Prefect's engine swaps in its own when it runs on the main thread,
    which crashes the flow run instead of stopping it at a page boundary)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="pagesync-flow", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short joins: signal handlers run between them
    if "error" in box:
        raise box["error"]
    return box["value"]


def _install_stop_handlers(console: Console, stop: Stop, stopped: list[int]) -> dict[int, Any]:
    """SIGTERM and Ctrl-C stop every partition at its next page; committed pages stay.

    Requests still in flight after a few seconds are aborted; a second signal exits at once.
    """

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stopped.append(signum)
        name = signal.Signals(signum).name
        console.print(
            f"[yellow]{name}: stopping after the page in progress (again to quit now)[/yellow]"
        )
        stop.request(name, abort_after=ABORT_AFTER)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


class _PeopleHandler(logging.Handler):
    """pagesync's own warnings, shown to the person running the CLI."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {record.getMessage()}", highlight=False)
