"""What the scenarios share: the demo API subprocess, pagesync configs, commands and
environments, and reading results back from the databases."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from pagesync.prefect import local_server as embedded
from pagesync.prefect.local_server import ServerFiles, free_port, wait_until_healthy

BENCH = Path(__file__).resolve().parent
PREFECT_HOME = BENCH / ".prefect-home"
SERVER_HOME = BENCH / ".prefect-home-server"  # `--server`'s
RAW_LOOP = BENCH / "raw_loop.py"
DATA_START = datetime(2024, 1, 1, tzinfo=UTC)  # the demo API's first updated_at
DATA_SPAN = timedelta(days=31)  # its items span 30 days; one more covers the last group


class PrefectServer:
    """`prefect server start` once for the whole bench (`--server`): runs as under
    `pagesync up` or a worker, where a server is already up and a run pays no start."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> PrefectServer:
        port = free_port()
        home = SERVER_HOME
        home.mkdir(exist_ok=True)
        env = {
            **plain_env(),
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.url = f"http://127.0.0.1:{port}/api"
        log_path = home / "server.log"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until_healthy(self.url, self.proc, 300, "the Prefect server", log_path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)


class DemoAPIProcess:
    """`python -m pagesync.demo.api` in a subprocess, so its CPU is its own."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> DemoAPIProcess:
        cmd = [sys.executable, "-m", "pagesync.demo.api", "--port", "0", "--items", str(self.items)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once it listens
        found = re.search(r"listening on (\S+)", line)
        if not found:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the demo API did not start: {line!r}")
        self.url = found.group(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def _control(self, method: str, path: str, body: Any = None) -> None:
        httpx.request(
            method, f"{self.url}/_control/{path}", json=body, timeout=10
        ).raise_for_status()

    def set_latency(self, seconds: float) -> None:
        """Every data request answers `seconds` late (the API's `slow` fault); 0 clears it."""
        self._control("DELETE", "faults")
        if seconds > 0:
            self._control("POST", "faults", {"kind": "slow", "delay": seconds, "times": -1})

    def request_times(self) -> list[float]:
        """When each request since the last `forget_requests` arrived (Unix time)."""
        response = httpx.get(f"{self.url}/_control/requests", timeout=30)
        response.raise_for_status()
        return [r["at"] for r in response.json()]

    def forget_requests(self) -> None:
        """The API logs every request in memory; keep that flat between runs."""
        self._control("DELETE", "requests")

    def first_page(self, page_size: int) -> str:
        return f"{self.url}/db/items.json?_size={page_size}"


# --------------------------------------------------------------------------- streams


def items_stream(page_size: int, single: bool = False) -> dict[str, Any]:
    """The datasette-shaped stream of README's example, checkpointed every page."""
    stream: dict[str, Any] = {
        "source": "demo",
        "path": "/db/items.json",
        "params": {"_size": page_size},
        "records": "rows",
        "primary_key": ["id"],
        "checkpoint": {"every_pages": 1},
    }
    if single:
        stream["paginator"] = {"type": "single"}
    else:
        stream["cursor"] = {"field": "updated_at", "param": "updated_at__gte"}
        stream["paginator"] = {"type": "next_url", "path": "next_url"}
    return stream


def partitioned_stream(page_size: int, partitions: int) -> dict[str, Any]:
    """`partitions` equal datetime windows over the API's 30 days, keyset pages in each."""
    hours = math.ceil(DATA_SPAN / timedelta(hours=1) / partitions)
    end = DATA_START + timedelta(hours=hours * partitions)
    return {
        "source": "demo",
        "path": "/next/items",
        "params": {"limit": page_size},
        "records": "data.items",
        "primary_key": ["id"],
        "cursor": {"field": "updated_at", "param": "updated_at__gte"},
        "paginator": {"type": "next_url", "path": "next_url"},
        "checkpoint": {"every_pages": 1},
        "partitions": {
            "type": "datetime",
            "start": DATA_START.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "step": f"PT{hours}H",
            "start_param": "updated_at__gte",
            "end_param": "updated_at__lt",
        },
    }


def write_config(
    path: Path,
    *,
    base_url: str,
    streams: dict[str, dict[str, Any]],
    state: str,
    destination: str | None = None,
    concurrency: int = 4,
) -> Path:
    """A pagesync.yaml for one run: one source (the demo API), the given streams."""
    doc = {
        "state": state,
        "destination": destination or state,
        "sources": {"demo": {"base_url": base_url, "timeout": 60, "concurrency": concurrency}},
        "streams": streams,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


# --------------------------------------------------------------------------- commands


def pagesync_cmd(stream: str, config: Path) -> list[str]:
    """`pagesync run STREAM -c CONFIG`, with the console script of this interpreter."""
    script = Path(sys.executable).parent / "pagesync"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pagesync.cli"]
    return [*base, "run", stream, "-c", str(config)]


def raw_cmd(url: str, *args: str) -> list[str]:
    return [sys.executable, str(RAW_LOOP), url, *args]


def pagesync_env(cold: bool = False) -> dict[str, str]:
    """No Prefect settings but a fixed PREFECT_HOME: pagesync's local server on a warm
    home, kept between runs, or (`cold`) started and stopped by every run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PAGESYNC_"))}
    env["PREFECT_HOME"] = str(PREFECT_HOME)
    if cold:
        env["PAGESYNC_SERVER_IDLE"] = "0"
    return env


def local_server() -> psutil.Process | None:
    """The local Prefect server kept for the bench's PREFECT_HOME, if one runs."""
    rec = ServerFiles(PREFECT_HOME).read()
    try:
        return psutil.Process(int(str(rec["pid"]))) if rec else None
    except psutil.Error:
        return None


def stop_local_server() -> None:
    """`pagesync server stop` for the bench's PREFECT_HOME."""
    embedded.stop_local_server(ServerFiles(PREFECT_HOME))


def task_runs_recorded(home: Path = PREFECT_HOME) -> int:
    """How many task runs the Prefect database of `home` holds (0 if it has none yet)."""
    db = home / "prefect.db"
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM task_run").fetchone()[0])
        except sqlite3.OperationalError:  # not migrated yet
            return 0


def forget_history(home: Path = PREFECT_HOME) -> None:
    """Start the bench's local server on an empty run history.

    On SQLite, Prefect's task run recorder looks up each batch of task runs with a row-value
    IN that scans the whole task_run table, so its CPU per page task run grows with every
    run kept (docs/performance.md, 2026-12-06 morning): figures taken on a history that
    earlier benches left behind are not comparable. The migrated database of an earlier
    invocation is kept as a template, so this costs a server start, not the migrations."""
    stop_local_server()
    template = home / "prefect-empty.db"
    for path in home.glob("prefect.db*"):
        path.unlink()
    if template.exists():
        shutil.copyfile(template, home / "prefect.db")


def keep_as_template(home: Path = PREFECT_HOME) -> None:
    """After the first warm-up of a new home: its freshly migrated database (one run in it)
    becomes the template `forget_history` starts from."""
    template = home / "prefect-empty.db"
    if template.exists() or not (home / "prefect.db").exists():
        return
    stop_local_server()  # its database is checkpointed and closed
    shutil.copyfile(home / "prefect.db", template)


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PAGESYNC_"))}


# --------------------------------------------------------------------------- databases


def sqlite_count(path: Path, table: str = "items") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


def _parse_utc(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def commit_times(path: Path) -> list[datetime]:
    """committed_at of every page in pagesync's page log, oldest first."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT committed_at FROM pagesync_pages ORDER BY committed_at")
        return [_parse_utc(r[0]) for r in rows if r[0] is not None]


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class Postgres:
    """A PostgreSQL server given as a SQLAlchemy URL; each run gets a schema of its own."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo, autocommit=True)

    @contextmanager
    def schema(self) -> Iterator[str]:
        """A fresh, empty schema, dropped afterwards."""
        name = f"pagesync_bench_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        try:
            yield name
        finally:
            with self.connect() as conn:
                conn.execute(f'DROP SCHEMA "{name}" CASCADE')

    label = "PostgreSQL"

    def raw_args(self, schema: str) -> list[str]:
        return ["--postgres", self.conninfo, "--schema", schema]

    def sqlalchemy_url(self, schema: str) -> str:
        """The URL with search_path set to `schema` (passed to libpq as `options`)."""
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}options=-csearch_path%3D{schema}"

    def commit_times(self, schema: str) -> list[datetime]:
        """committed_at of every page in pagesync's page log in `schema`, oldest first."""
        with self.connect() as conn:
            sql = f'SELECT committed_at FROM "{schema}".pagesync_pages ORDER BY committed_at'
            return [_parse_utc(r[0]) for r in conn.execute(sql) if r[0] is not None]

    def count(self, schema: str, table: str = "items") -> int:
        with self.connect() as conn:
            row = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()
            return int(row[0]) if row else 0


class DuckDB:
    """DuckDB files in a folder; each run gets a file of its own."""

    label = "DuckDB"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextmanager
    def schema(self) -> Iterator[str]:
        path = self.folder / f"bench_{uuid.uuid4().hex[:12]}.duckdb"
        try:
            yield str(path)
        finally:
            for p in (path, path.with_name(path.name + ".wal")):
                p.unlink(missing_ok=True)

    def raw_args(self, path: str) -> list[str]:
        return ["--duckdb", path]

    def sqlalchemy_url(self, path: str) -> str:
        return f"duckdb:///{path}"

    def _query(self, path: str, sql: str) -> list[Any]:
        import duckdb

        with duckdb.connect(path, read_only=True) as conn:
            return conn.execute(sql).fetchall()

    def commit_times(self, path: str) -> list[datetime]:
        rows = self._query(path, "SELECT committed_at FROM pagesync_pages ORDER BY committed_at")
        return [_parse_utc(r[0]) for r in rows if r[0] is not None]

    def count(self, path: str, table: str = "items") -> int:
        return int(self._query(path, f'SELECT count(*) FROM "{table}"')[0][0])


class MariaDB:
    """A MySQL/MariaDB server given as a SQLAlchemy URL (`mysql+pymysql://root@host:3306/db`);
    each run gets a database of its own."""

    label = "MariaDB"

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = make_url(url)

    def connect(self, database: str | None = None) -> Any:
        import pymysql

        u = self.url
        return pymysql.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                               user=u.username or "root", password=u.password or "",
                               database=database, autocommit=True)  # fmt: skip

    @contextmanager
    def schema(self) -> Iterator[str]:
        name = f"pagesync_bench_{uuid.uuid4().hex[:12]}"
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        try:
            yield name
        finally:
            with self.connect() as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE `{name}`")

    def sqlalchemy_url(self, name: str) -> str:
        return self.url.set(database=name).render_as_string(False)

    def raw_args(self, name: str) -> list[str]:
        return ["--mysql", self.sqlalchemy_url(name)]

    def _query(self, name: str, sql: str) -> list[Any]:
        with self.connect(name) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def commit_times(self, name: str) -> list[datetime]:
        rows = self._query(name, "SELECT committed_at FROM pagesync_pages ORDER BY committed_at")
        return [_parse_utc(r[0]) for r in rows if r[0] is not None]

    def count(self, name: str, table: str = "items") -> int:
        return int(self._query(name, f"SELECT count(*) FROM `{table}`")[0][0])
