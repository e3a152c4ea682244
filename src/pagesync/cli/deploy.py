"""`pagesync up` and `pagesync deploy`: a config's streams as Prefect deployments.

`up` is the one-machine way: it finds a Prefect server (or starts one with its UI), registers
every stream's deployments and serves them until Ctrl-C or SIGTERM, then stops what it
started. `deploy` registers the same deployments to an existing server and work pool, for
workers on other infrastructure. Prefect is imported only inside the commands, after its
settings are in place.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any
from uuid import UUID

import httpx
import typer
from rich.markup import escape

from ..core.config import Config
from ..prefect.settings import configure
from .app import ConfigOpt, VerboseOpt, _config, app, err, fail, out

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

#: A first server start on a fresh machine migrates its database: allow for a slow one.
SERVER_STARTUP_TIMEOUT = float(os.environ.get("PAGESYNC_SERVER_STARTUP_TIMEOUT", "300"))


class _Stop(Exception):
    """SIGTERM before the runner installed its own handler (which stops it gracefully)."""


#: Set by the first SIGTERM: whatever is raised after it is the stop, not a failure.
_STOPPING: list[int] = []


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    """Raised wherever the main thread is, which can be inside pydantic building a schema:
    it then comes out as that library's own error (a SchemaError naming `_Stop`)."""
    _STOPPING.append(signum)
    raise _Stop(signum)


@contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGTERM handled by `handler` inside the block."""
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    """While stopping what `up` started: a second Ctrl-C or SIGTERM must not cut it short."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _failure(e: Exception, verbose: bool) -> typer.Exit:
    """An unexpected error as one line (exit 1), its traceback only with --verbose; our own
    exits pass through."""
    if isinstance(e, typer.Exit):
        return e
    if verbose:
        err.print_exception()
    return fail(f"{type(e).__name__}: {e}", 1)


def _answers(api_url: str, attempts: int = 3) -> bool:
    """Whether a server answers at `api_url` (a 401 counts: it is there, the key is the
    user's business); a 5xx is retried, a busy SQLite-backed server sends some."""
    for _ in range(attempts):
        try:
            status = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5).status_code
        except httpx.HTTPError:
            return False
        if status < 500:
            return True
    return False


def _configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


def _prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


@contextmanager
def _api_url(url: str) -> Iterator[None]:
    """Point this process (it already imported Prefect) and its children at `url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _ui_url() -> str:
    from prefect.settings import PREFECT_UI_URL

    return str(PREFECT_UI_URL.value() or "").rstrip("/")


# -- the server `up` may start ------------------------------------------------------------


def _start_server(port: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`prefect server start` (SQLite in PREFECT_HOME, default ~/.prefect) with its UI, in its
    own session so a terminal's Ctrl-C reaches it only through us, after the runner."""
    home = _prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "pagesync-up-server.log"
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return proc, url, log_path


def _wait_for_server(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    started = time.monotonic()
    deadline = started + SERVER_STARTUP_TIMEOUT
    note = "a first start on a machine migrates its database and can take a minute"
    with out.status(f"Starting a Prefect server at {url} ({note})") as status:
        if not out.is_terminal:
            out.print(f"Starting a Prefect server at {url} ({note}) …")
        next_note = started + 15
        while not _answers(url):
            now = time.monotonic()
            if proc.poll() is not None:
                raise fail(
                    f"the Prefect server exited with code {proc.returncode}; "
                    f"its log: {log_path}\n{_tail(log_path)}",
                    1,
                )
            if now > deadline:
                raise fail(
                    f"the Prefect server did not answer within {SERVER_STARTUP_TIMEOUT:.0f}s; "
                    f"its log: {log_path}",
                    1,
                )
            waited = now - started
            status.update(f"Starting a Prefect server at {url} ({note}) … {waited:.0f}s")
            if not out.is_terminal and now >= next_note:
                out.print(f"  still starting … {waited:.0f}s")
                next_note = now + 15
            time.sleep(0.5)  # polling the server's health endpoint, with a deadline
    out.print(f"[green]✓[/green] Prefect server ready in {time.monotonic() - started:.1f}s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    out.print("Stopping the Prefect server pagesync started …")
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- up -----------------------------------------------------------------------------------


@app.command()
def up(
    config: ConfigOpt = None,
    port: Annotated[
        int, typer.Option(help="Port of the Prefect server to start when none answers.")
    ] = 4200,
    verbose: VerboseOpt = False,
) -> None:
    """Serve every stream's deployments on a Prefect server with its UI (started if none).

    Each stream gets an incremental deployment (on its `schedule:`) and a backfill one.
    The server is the one at PREFECT_API_URL, else one started here; Ctrl-C stops the
    runner and the server it started.
    """
    cfg = _config(config)
    configure()
    # Flow runs print to this terminal: only with --verbose (the UI has every log line).
    os.environ.setdefault(
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL"
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        with _signals(_raise_stop):  # Ctrl-C raises KeyboardInterrupt, as usual
            configured = _configured_api_url()
            url = configured if configured and _answers(configured) else None
            local = f"http://127.0.0.1:{port}/api"
            if url is None and configured != local and _answers(local):
                url = local
            if url is None:
                if configured:
                    out.print(
                        f"[yellow]No Prefect server answers at {escape(configured)}.[/yellow]"
                    )
                server, url, log_path = _start_server(port)
                _wait_for_server(server, url, log_path)
            with _api_url(url):
                _serve(cfg, url, started_server=server is not None)
    except (_Stop, KeyboardInterrupt):
        pass
    except Exception as e:
        if not _STOPPING:
            raise _failure(e, verbose) from None
    finally:
        if server is not None:
            with _ignoring_signals():
                _stop_server(server)
    out.print("Stopped.")


def _serve(cfg: Config, url: str, *, started_server: bool) -> None:
    from prefect.runner import Runner

    from ..prefect.deploy import build_deployments, serve_environment

    serve_environment(cfg)
    deployments = build_deployments(cfg)
    runner = Runner(name="pagesync-up", pause_on_shutdown=True)

    async def main() -> None:
        names = {}
        for d in deployments:
            names[await runner.aadd_deployment(d)] = f"{d.flow_name}/{d.name}"
        _print_served(cfg, deployments, url, started_server)
        reporter = asyncio.create_task(_report_runs(names, _ui_url()))
        try:
            await runner.start()
        finally:
            reporter.cancel()
            with suppress(asyncio.CancelledError):
                await reporter

    # The runner stops gracefully on SIGTERM (its own handler) and on Ctrl-C (asyncio.run
    # cancels it, then raises KeyboardInterrupt); either way its runs are stopped first.
    asyncio.run(main())


def _print_served(
    cfg: Config, deployments: list[RunnerDeployment], url: str, started: bool
) -> None:
    from ..prefect.deploy import INCREMENTAL, describe_schedule

    where = "started by pagesync" if started else "already running"
    out.print(f"[green]✓[/green] Prefect API {url} ({where})")
    out.print(f"Serving {len(deployments)} deployments of {cfg.path}:")
    for d in deployments:
        stream = d.flow_name or ""
        when = describe_schedule(cfg, stream) if d.name == INCREMENTAL else "on demand: start, end"
        out.print(f"  {escape(f'{stream}/{d.name}'):<40} {escape(when)}")
    out.print(f"UI: [bold]{_ui_url()}/deployments[/bold]")
    out.print("Ctrl-C stops the runner" + (" and the server." if started else "."))


_FINAL = {"COMPLETED": "[green]✓[/green]", "FAILED": "[red]✗[/red]", "CRASHED": "[red]✗[/red]",
          "CANCELLED": "[yellow]■[/yellow]"}  # fmt: skip


async def _report_runs(names: dict[UUID, str], ui: str, every: float = 2.0) -> None:
    """One line when a served flow run starts and one when it ends (Prefect's own console
    output is turned down: the UI has every log line)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    watched = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=list(names)),
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.COMPLETED, StateType.FAILED,
                      StateType.CRASHED, StateType.CANCELLED]
            )
        ),
    )  # fmt: skip
    seen: dict[UUID, tuple[str, int]] = {}
    first = True
    async with get_client() as client:
        while True:
            try:
                runs = await client.read_flow_runs(
                    flow_run_filter=watched, sort=FlowRunSort.START_TIME_DESC, limit=50
                )
            except Exception:  # a busy server; the next poll will do
                runs = []
            for run in reversed(runs):
                state = run.state.type.value if run.state else ""
                key = (state, run.run_count)
                if seen.get(run.id) == key:
                    continue
                seen[run.id] = key
                if first:
                    continue
                name = names.get(run.deployment_id, "?") if run.deployment_id else "?"
                head = f"{escape(name)}: run {str(run.id)[:8]}"
                if state == "RUNNING":
                    again = f" (attempt {run.run_count})" if run.run_count > 1 else ""
                    out.print(f"▶ {head} started{again}, {escape(_params(run.parameters))}")
                elif state in _FINAL:
                    message = run.state.message if run.state and state != "COMPLETED" else None
                    took = f" in {run.total_run_time.total_seconds():.1f}s"
                    line = f"{_FINAL[state]} {head} {state.lower()}{took}"
                    if message:
                        line += f": {escape(message)}"
                        line += f"\n    {ui}/runs/flow-run/{run.id}"
                    out.print(line)
            first = False
            await asyncio.sleep(every)  # the report's polling period


def _params(parameters: dict[str, Any]) -> str:
    shown = {k: v for k, v in parameters.items() if k not in ("stream", "config")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "incremental"


# -- deploy -------------------------------------------------------------------------------


@app.command()
def deploy(
    pool: Annotated[str, typer.Option("--pool", help="Work pool whose workers run the flows.")],
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Register every stream's deployments to a Prefect server's work pool.

    The server is the one at PREFECT_API_URL; the pool's workers need pagesync installed
    and the config file at the same absolute path.
    """
    cfg = _config(config)
    configure()
    try:
        url = _configured_api_url()
        if not url:
            raise fail("no Prefect server configured: set PREFECT_API_URL (or use `pagesync up`)")
        if not _answers(url):
            raise fail(f"no Prefect server answers at {url}", 1)
        _register(cfg, pool, url)
    except Exception as e:
        raise _failure(e, verbose) from None


def _register(cfg: Config, pool: str, url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from ..prefect.deploy import build_deployments, describe_schedule

    with get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
        except ObjectNotFound:
            raise fail(
                f"work pool {pool!r} not found at {url}; create it with "
                f"`prefect work-pool create {pool} --type process`"
            ) from None
    from ..prefect.ratelimit import ensure_limits

    deployments = build_deployments(cfg, work_pool=pool)
    for d in deployments:
        d.apply()
    limits = ensure_limits(cfg)  # fan_out: deployment streams' rate limits, across workers
    out.print(
        f"[green]✓[/green] {len(deployments)} deployments of {cfg.path} registered to work pool "
        f"{escape(pool)} ({escape(work_pool.type)}) at {url}:"
    )
    for d in deployments:
        when = (
            describe_schedule(cfg, d.flow_name)
            if d.name == "incremental"
            else "started by fan_out: deployment streams"
            if d.name == "partitions"
            else "on demand"
        )
        out.print(f"  {escape(f'{d.flow_name}/{d.name}'):<40} {escape(when)}")
    for name in limits:
        out.print(f"  global concurrency limit {escape(name)} (the source's rate_limit)")
    out.print(
        f"Start a worker where pagesync is installed and {cfg.path} exists: "
        f"[bold]prefect worker start --pool {escape(pool)}[/bold]"
    )
