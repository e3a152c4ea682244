"""The `pagesync` command line. Exit codes: 0 done, 1 a partition failed, 2 usage or config.

Output is for people (tables, a live progress display, one summary line); `--json` is for
scripts and its fields are a contract. Tracebacks only with --verbose: the Prefect UI has
them all.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from ..core.config import Config, load_config
from ..core.errors import ConfigError, PagesyncError
from . import tls
from .links import flow_run_url, task_run_url, ui_url

if TYPE_CHECKING:
    from ..core.store import Store
    from ..core.views import PartitionView

app = typer.Typer(
    name="pagesync",
    help="Sync paginated HTTP APIs into SQL databases, checkpointed per page, on Prefect 3.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "-c", "--config", help="Config file (default: $PAGESYNC_CONFIG, ./pagesync.yaml)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
VerboseOpt = Annotated[
    bool, typer.Option("-v", "--verbose", help="Show tracebacks and Prefect logs.")
]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise fail(str(e)) from None


def _stream(config: Config, stream: str) -> None:
    try:
        config.stream(stream)
    except ConfigError as e:
        raise fail(str(e)) from None


def _opened(path: Path | None, stream: str | None) -> tuple[Config, Store]:
    """The config (with `stream` checked, if given) and its store, migrated."""
    from ..core.store import Store

    cfg = _config(path)
    if stream:
        _stream(cfg, stream)
    store = Store(cfg.state)
    store.migrate()
    return cfg, store


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# -- run ----------------------------------------------------------------------------------


@app.command()
def run(
    stream: Annotated[str, typer.Argument(help="The stream to sync.")],
    config: ConfigOpt = None,
    full_refresh: Annotated[
        bool,
        typer.Option("--full-refresh", help="Ignore the high-water mark and completed partitions."),
    ] = False,
    verbose: VerboseOpt = False,
    fan_out: FanOutOpt = None,
) -> None:
    """Sync one stream; resumes every unfinished partition from its last committed page."""
    cfg = _config(config)
    _stream(cfg, stream)
    code = _run(cfg, stream, full_refresh=full_refresh, verbose=verbose, **_fan_out(fan_out))
    raise typer.Exit(code)


FanOutOpt = Annotated[
    str | None,
    typer.Option(
        "--fan-out",
        help="Where partitions run: threads (this process) or deployment (child flow runs "
        "on the workers of the partition deployment's pool). Default: the stream's fan_out.",
    ),
]


def _fan_out(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if value not in ("threads", "deployment"):
        raise fail(f"--fan-out: {value!r} is not threads or deployment")
    return {"fan_out": value}


def _run(cfg: Config, stream: str, *, verbose: bool = False, **params: Any) -> int:
    from .launch import run_stream
    from .progress import Progress

    started = time.monotonic()
    try:
        with Progress(out, stream) as progress:
            report = run_stream(
                cfg, stream, console=err, verbose=verbose, observers=[progress], **params
            )
    except ConfigError as e:  # e.g. PAGESYNC_SERVER_IDLE
        raise fail(str(e)) from None
    except PagesyncError as e:
        if verbose:
            err.print_exception()
        raise fail(str(e), 1) from None
    elapsed = time.monotonic() - started
    config_errors = [e for e in report.errors if isinstance(e, ConfigError)]
    if config_errors:  # running again would fail again: the config is what to fix
        for exc in config_errors:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    pages = sum(o.new_pages for o in report.outcomes)
    records = sum(o.new_records for o in report.outcomes)
    complete = sum(o.status == "complete" for o in report.outcomes)
    total = len(report.outcomes)
    line = (
        f"{stream}: {complete}/{total} partitions complete, {pages} pages, {records} records "
        f"in {elapsed:.1f}s"
    )
    if report.ok:
        out.print(f"[green]✓[/green] {escape(line)}")
        return 0
    if report.signal is not None:
        out.print(
            f"[yellow]■[/yellow] {escape(line)}; stopped, committed pages kept: run again to resume"
        )
        return 128 + report.signal
    out.print(f"[red]✗[/red] {escape(line)}; committed progress is kept, run again to resume")
    for exc in report.errors:
        err.print(f"[red]error:[/red] {escape(str(exc) or type(exc).__name__)}")
        if verbose:
            import traceback

            err.print("".join(traceback.format_exception(exc)), markup=False)
    return 1


@app.command()
def backfill(
    stream: Annotated[str, typer.Argument(help="The stream to backfill.")],
    start: Annotated[datetime, typer.Option(help="First instant (inclusive), e.g. 2024-01-01.")],
    end: Annotated[datetime, typer.Option(help="Last instant (exclusive).")],
    backfill_id: Annotated[
        str | None, typer.Option("--id", help="Checkpoint id (default: from stream and range).")
    ] = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
    fan_out: FanOutOpt = None,
) -> None:
    """Sync [start, end) window by window; running it again resumes where it stopped."""
    cfg = _config(config)
    _stream(cfg, stream)
    start, end = _utc(start), _utc(end)
    if end <= start:
        raise fail("--end must be after --start")
    code = _run(
        cfg, stream, verbose=verbose, start=start, end=end, backfill_id=backfill_id,
        **_fan_out(fan_out),
    )  # fmt: skip
    raise typer.Exit(code)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


# -- state --------------------------------------------------------------------------------


class _DefaultShow(TyperGroup):
    """`pagesync state [STREAM]` shows; `pagesync state import|export ...` are subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


state_app = typer.Typer(cls=_DefaultShow, help="Show, import or export checkpoint state.")
app.add_typer(state_app, name="state")


@state_app.command("show")
def state_show(
    stream: Annotated[str | None, typer.Argument(help="Only this stream.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per partition: status, cursor, pages, records, last update, and the last flow run
    that committed a page (its link in the Prefect UI when its address is known)."""
    from ..core.views import partition_views, refresh_locks

    cfg, store = _opened(config, stream)
    locks = refresh_locks(store, stream)
    views = partition_views(store, stream, locks)
    ui = ui_url()
    if as_json:
        _print_json([
            {**v.model_dump(mode="json"),
             "flow_run_url": flow_run_url(ui, v.flow_run_id) if ui and v.flow_run_id else None}
            for v in views
        ])  # fmt: skip
        return
    if not views:
        out.print("No state yet" + (f" for {stream}" if stream else "") + ".")
    else:
        _partition_table(views, ui)
    for lock in locks:
        name, holder = escape(lock.stream), escape(lock.holder)
        if lock.holder_gone:
            line = (f"[red]{name}:[/red] a refresh left unfinished by a runner that is gone "
                    f"({holder}); the next run takes it over")  # fmt: skip
        else:
            line = (f"[yellow]{name}:[/yellow] refreshing in {holder} (its lock is renewed, "
                    f"now until {lock.expires_at:%H:%M:%S} UTC); another refresh of it is "
                    "refused until it ends")  # fmt: skip
        out.print(line, highlight=False)
    for v in views:
        if v.error:
            err.print(f"[red]{escape(v.stream)} · {escape(v.partition)}:[/red] {escape(v.error)}")


def _partition_table(views: list[PartitionView], ui: str | None) -> None:
    table = Table()
    cols = ("stream", "partition", "status", "cursor", "pages", "records", "updated_at")
    for col in (*cols, "last flow run"):
        table.add_column(col, justify="right" if col in ("pages", "records") else "left")
    colors = {"complete": "green", "incomplete": "red", "running": "yellow", "pending": "dim"}
    for v in views:
        part = v.partition if not v.scope else f"{v.partition} [dim]({escape(v.scope)})[/dim]"
        color = "red" if v.holder_dead_since else colors.get(v.status, "white")
        status = f"[{color}]{v.shown_status}[/]"
        run = v.flow_run_id or ""
        table.add_row(
            v.stream, part, status, escape("" if v.cursor is None else str(v.cursor)),
            str(v.pages), str(v.records), v.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            flow_run_url(ui, run) if ui and run else run,
        )  # fmt: skip
    _print_whole(table)


@state_app.command("import")
def state_import(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    file: Annotated[Path, typer.Argument(help="JSON state file; - for standard input.")],
    config: ConfigOpt = None,
) -> None:
    """Start a stream from another tool's state (Airbyte STREAM/GLOBAL, legacy object, [])."""
    from ..core.interop import import_state
    from ..core.store import Store

    cfg = _config(config)
    _stream(cfg, stream)
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise fail(f"{file}: cannot read JSON state: {e}") from None
    try:
        value = import_state(Store(cfg.state), cfg, stream, data)
    except PagesyncError as e:
        raise fail(f"{file}: {e}") from None
    if value is None:
        out.print(f"{stream}: empty state imported; the next run starts from scratch.")
    else:
        out.print(f"{stream}: the next run starts from cursor {value!r}.")


@state_app.command("export")
def state_export(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    config: ConfigOpt = None,
) -> None:
    """Write the stream's state as an Airbyte per-stream state array (JSON)."""
    from ..core.interop import export_state

    cfg, store = _opened(config, stream)
    _print_json(export_state(store, cfg, stream))


@app.command()
def history(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per committed page: partition, page, records, cursor, time, flow and task run ids;
    with the task run's link in the Prefect UI when its address is known."""
    from ..core.views import page_views

    cfg, store = _opened(config, stream)
    views = page_views(store, stream)
    ui = ui_url()
    if as_json:
        _print_json([
            {**v.model_dump(mode="json"),
             "task_run_url": task_run_url(ui, v.task_run_id) if ui and v.task_run_id else None}
            for v in views
        ])  # fmt: skip
        return
    table = Table()
    last = "task run" if ui else "task_run_id"
    for col in ("partition", "page", "records", "cursor", "committed_at", last):
        table.add_column(col, justify="right" if col in ("page", "records") else "left")
    for v in views:
        run = v.task_run_id or ""
        table.add_row(
            escape(v.partition), str(v.page), str(v.records),
            escape("" if v.cursor is None else str(v.cursor)),
            v.committed_at.strftime("%Y-%m-%d %H:%M:%S"),
            task_run_url(ui, run) if ui and run else run,
        )  # fmt: skip
    _print_whole(table)


def _print_whole(table: Table) -> None:
    """Print a table as wide as its contents, so links and ids are never cut or folded
    to fit the terminal (a terminal wraps long lines; the text stays whole)."""
    from rich.measure import Measurement

    need = Measurement.get(out, out.options.update_width(100_000), table).maximum
    if need <= out.width:
        out.print(table)
        return
    wide = Console(
        file=out.file, width=need, highlight=False, soft_wrap=True,
        force_terminal=out.is_terminal, color_system=out.color_system or None,
    )  # fmt: skip
    wide.print(table)


@app.command()
def reset(
    stream: Annotated[str, typer.Argument(help="The stream.")],
    config: ConfigOpt = None,
) -> None:
    """Forget a stream's checkpoints (its destination table is kept)."""

    cfg, store = _opened(config, stream)
    n = store.reset(stream)
    out.print(f"Reset {stream}: {n} partition(s) forgotten; the next run starts from scratch.")


# -- check, demo --------------------------------------------------------------------------


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the config, import its Python streams and models, read each stream's first page.

    Exit 2 when the config or its code is wrong, or a first page contradicts it (records
    path, has_more, total, cursor field, GraphQL errors); 1 when a source does not answer."""
    from ..core.errors import ExtractError
    from ..core.extract import cursor_values
    from ..core.http import SourceClient
    from ..core.paginators import base_request
    from ..core.streams import Declarative, user_code

    cfg = _config(config)
    out.print(
        f"[green]✓[/green] {cfg.path}: {len(cfg.sources)} source(s), {len(cfg.streams)} stream(s)"
    )
    wrong, readers = 0, {}
    for name, stream in cfg.streams.items():
        try:
            readers[name], model = user_code(cfg, name)
        except ConfigError as e:
            wrong += 1
            out.print(f"[red]✗[/red] {name}: {escape(str(e))}")
            continue
        found = [type(readers[name]).__qualname__] if stream.class_ else []
        found += [model.__qualname__] if model is not None else []
        if found:
            out.print(f"[green]✓[/green] {name}: imports {escape(', '.join(found))}")
    if wrong:
        raise typer.Exit(2)
    bad = shape = 0
    for name, stream in cfg.streams.items():
        source = cfg.sources[stream.source]
        once = source.model_copy(update={"retry": source.retry.model_copy(update={"attempts": 1})})
        client = SourceClient(once)
        reader = readers[name]
        base = base_request(stream, stream.path if "{" not in stream.path else "/", {})
        try:  # the stream's first request, as a run would send it (less partition values)
            response = client.get(reader.request(base, reader.first()))
            # The first page read as a run reads it: a records path, stop path or
            # GraphQL error the response contradicts is the config's to fix (exit 2).
            if isinstance(reader, Declarative):
                try:
                    parsed = reader.parse(response, reader.first())
                    if stream.cursor is not None:
                        cursor_values(parsed.records, stream.cursor.field)
                except ExtractError as e:
                    e.url = client.redact(response.url)
                    shape += not e.transient
                    raise
            out.print(
                f"[green]✓[/green] {name}: {escape(client.redact(response.url))} answered "
                f"{response.status_code}"
            )
        except PagesyncError as e:
            bad += 1
            out.print(f"[red]✗[/red] {name}: {escape(client.hide(str(e)))}")
        finally:
            client.close()
    raise typer.Exit(2 if shape else 1 if bad else 0)


@app.command()
def demo(
    folder: Annotated[Path, typer.Option(help="Where the demo's config and database go.")] = Path(
        "pagesync-demo"
    ),
    stream: Annotated[str, typer.Option(help="Which demo stream to sync.")] = "items",
    items: Annotated[int, typer.Option(help="Records the demo API serves.")] = 20_000,
    verbose: VerboseOpt = False,
) -> None:
    """Start the bundled demo API and sync it into SQLite: pagesync end to end."""
    from ..demo.api import DemoAPI
    from ..demo.project import write_demo

    path = write_demo(folder)
    with DemoAPI(items=items) as api:
        import os

        os.environ["PAGESYNC_DEMO_URL"] = api.url
        out.print(f"Demo API with {items:,} records at {api.url}; config in {path}")
        cfg = _config(path)
        _stream(cfg, stream)
        code = _run(cfg, stream, verbose=verbose)
    out.print(
        f"Look around: [bold]pagesync state -c {path}[/bold], [bold]pagesync history {stream} -c {path}[/bold]"
    )
    raise typer.Exit(code)


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to write the files.")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Write a commented starter pagesync.yaml and a Python stream example."""
    from importlib.resources import files

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, template in (("pagesync.yaml", "starter.yaml"), ("streams.py", "streams.py")):
        target = folder / name
        if target.exists() and not force:
            raise fail(f"{target} exists (use --force to overwrite)")
        target.write_text(files("pagesync").joinpath(f"templates/{template}").read_text())
        written.append(str(target))
    out.print(
        f"Wrote {', '.join(written)}. Next: [bold]pagesync check[/bold], then [bold]pagesync run issues[/bold]."
    )


@app.command()
def schema() -> None:
    """Print the JSON Schema of pagesync.yaml (for editors: yaml-language-server)."""
    from ..core.config import json_schema

    _print_json(json_schema())


# -- server -------------------------------------------------------------------------------

server_app = typer.Typer(
    help="The local Prefect server `pagesync run` keeps when no PREFECT_API_URL is set.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("status")
def server_status(as_json: JsonOpt = False) -> None:
    """Whether this PREFECT_HOME's local Prefect server runs, where, since when, and the
    secret its API and UI ask for."""
    from ..prefect.local_server import ServerFiles

    files = ServerFiles.here()
    rec = files.read()
    secret = None
    if rec is not None:
        try:
            secret = files.read_secret()
        except ConfigError as e:
            raise fail(str(e)) from None
    if as_json:
        _print_json({"running": rec is not None, "clients": files.live_clients(), **(rec or {}),
                     **({"auth_string": secret} if secret else {})})  # fmt: skip
        return
    if rec is None:
        out.print(f"No local Prefect server runs for {files.home}.")
        return
    since = datetime.fromtimestamp(float(str(rec["started"])), UTC)
    out.print(
        f"Local Prefect server at {rec['api_url']} (pid {rec['pid']}, since "
        f"{since:%Y-%m-%d %H:%M:%S} UTC, leaves {float(str(rec['idle'])):g} s after its last run; "
        f"runs using it now: {len(files.live_clients())})."
    )
    out.print(f"Its API asks for a secret (PREFECT_API_AUTH_STRING for Prefect clients): {secret}")


@server_app.command("stop")
def server_stop(
    force: Annotated[
        bool, typer.Option("--force", help="Stop it even while runs use it (they fail).")
    ] = False,
) -> None:
    """Stop this PREFECT_HOME's local Prefect server (its runs and logs stay in its database)."""
    from ..prefect.local_server import ServerFiles, stop_local_server

    users = ServerFiles.here().live_clients()
    if users and not force:
        pids = ", ".join(map(str, users))
        raise fail(f"the local Prefect server is in use by running pagesync processes ({pids}); "
                   "let them finish, or stop it anyway with --force", 1)  # fmt: skip
    rec = stop_local_server()
    if rec is None:
        out.print("No local Prefect server was running.")
    else:
        out.print(f"Stopped the local Prefect server at {rec['api_url']} (pid {rec['pid']}).")


def main() -> None:
    from . import deploy  # noqa: F401  (registers up and deploy on `app`)

    tls.install()  # before any HTTP client: a run makes seven (see tls)

    try:
        app()
    except SystemExit as e:
        code = e.code
    else:  # pragma: no cover - typer's standalone mode always exits
        code = 0
    exit_now(code)


def exit_now(code: int | str | None) -> NoReturn:
    """Exit without the interpreter's teardown, which spends about a second freeing what a
    run imported (Prefect's models and settings) one object at a time (measured).

    What matters of an ordinary exit is done first, in its order: Prefect's event and log
    workers send what they hold, then the atexit handlers run (Prefect's, and ours that
    stop or leave the local server after Prefect's last events reached it)."""
    from ..prefect.settings import drain_prefect_workers

    drain_prefect_workers(timeout=30)
    if isinstance(code, str):
        err.print(code)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code or 0)
