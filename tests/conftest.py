"""Test fixtures: real parts only. A real Prefect server (one per session), the project's
own HTTP API on loopback with switchable faults, SQLite files and a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pagesync.demo.api import DemoAPI
from pagesync.prefect.local_server import free_port, wait_until_healthy

PG_ADMIN_URL = os.environ.get("PAGESYNC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MYSQL_ADMIN = os.environ.get("PAGESYNC_TEST_MYSQL", "root@127.0.0.1:3306")
_SERVER: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Start one real Prefect server for the whole session, before Prefect is imported.

    Prefect reads its settings when it is first imported, so PREFECT_API_URL must be set
    before any test module imports pagesync.flows.
    """
    if os.environ.get("PAGESYNC_TEST_NO_SERVER"):
        return
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller started it
        _SERVER.update(url=os.environ["PREFECT_API_URL"], home=os.environ["PAGESYNC_TEST_SERVER"])
        return
    home = Path(tempfile.mkdtemp(prefix="pagesync-prefect-"))
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    url = f"http://127.0.0.1:{port}/api"
    env["PREFECT_UI_API_URL"] = url  # where the UI in a browser finds the API (default :4200)
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until_healthy(url, proc, 300, "the tests' Prefect server", home / "server.log")
    except RuntimeError:
        proc.kill()
        raise
    _SERVER.update(proc=proc, home=home, url=url, log=log)
    os.environ.update(
        PAGESYNC_TEST_SERVER=str(home),  # for pytest-xdist's workers, which inherit it
        PREFECT_API_URL=url,
        PREFECT_HOME=str(home / "client"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if "url" in _SERVER:
        from pagesync.prefect.settings import drain_prefect_workers

        drain_prefect_workers(timeout=10)  # flows ran in this process: their last logs, events
    proc = _SERVER.get("proc")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        _SERVER["log"].close()
        shutil.rmtree(_SERVER["home"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    return _SERVER["url"]


@pytest.fixture
def api() -> Iterator[DemoAPI]:
    with DemoAPI(items=2000) as server:
        yield server


def cleaned(server: DemoAPI) -> Iterator[DemoAPI]:
    """A module's shared demo API for one test: no faults, an empty request log, before and
    after (`yield from cleaned(server)` in a fixture)."""
    server.clear_faults()
    server.clear_requests()
    yield server
    server.clear_faults()
    server.clear_requests()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it."""
    import psycopg

    name = f"pagesync_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    from pagesync.core.store import _ENGINES

    for key in [k for k in _ENGINES if k.endswith(f"/{name}")]:
        _ENGINES.pop(key).dispose()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _mysql_admin(statement: str) -> None:
    """Run one statement as MariaDB's admin user (database creation and removal)."""
    import pymysql

    user, _, hostport = MYSQL_ADMIN.rpartition("@")
    host, _, port = hostport.partition(":")
    conn = pymysql.connect(host=host, port=int(port or 3306), user=user, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def mysql_database(prefix: str = "pagesync") -> tuple[str, str]:
    """A new, empty MariaDB database: its name and its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _mysql_admin(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    return name, f"mysql+pymysql://{MYSQL_ADMIN}/{name}"


def drop_mysql_database(name: str) -> None:
    from pagesync.core.store import _ENGINES

    for key in [k for k in _ENGINES if k.endswith(f"/{name}")]:
        _ENGINES.pop(key).dispose()
    _mysql_admin(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """A fresh MariaDB database for one test, dropped after it."""
    name, url = mysql_database()
    yield url
    drop_mysql_database(name)


#: The databases pagesync writes to, as test parameters: each is a real engine.
ENGINES = ["sqlite", "postgres", "duckdb", "mariadb"]


def database_url(kind: str, request: pytest.FixtureRequest, folder: Path, name: str = "p") -> str:
    """A fresh database of `kind` for one test: a file in `folder`, or a server's database."""
    if kind == "sqlite":
        return f"sqlite:///{folder / f'{name}.db'}"
    if kind == "duckdb":
        return f"duckdb:///{folder / f'{name}.duckdb'}"
    return request.getfixturevalue({"postgres": "pg_url", "mariadb": "mysql_url"}[kind])


def write_config(
    folder: Path,
    base_url: str,
    streams: dict[str, dict[str, Any]],
    *,
    state: str = "sqlite:///pagesync.db",
    destination: str | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """A pagesync.yaml in `folder` with one source, `shop`, and the given streams."""
    data: dict[str, Any] = {
        "state": state,
        "sources": {"shop": {"base_url": base_url, "retry": {"attempts": 3, "backoff": 0.01,
                                                              "max_backoff": 0.05, "task_retries": 1},
                             **(source or {})}},
        "streams": {name: {"source": "shop", **spec} for name, spec in streams.items()},
    }  # fmt: skip
    if destination:
        data["destination"] = destination
    path = folder / "pagesync.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def daily_stream(limit: int) -> dict[str, Any]:
    """A stream of daily windows over the demo API's January 2024 (~67 records a day),
    `limit` records per page."""
    return {
        "path": "/next/items", "params": {"limit": limit}, "records": "data.items",
        "primary_key": ["id"], "cursor": {"field": "updated_at", "param": "updated_at__gte"},
        "paginator": {"type": "next_url", "path": "next_url"},
        "partitions": {"type": "datetime", "start": "2024-01-01T00:00:00Z",
                       "end": "2024-02-01T00:00:00Z", "step": "P1D",
                       "start_param": "updated_at__gte", "end_param": "updated_at__lt"},
    }  # fmt: skip


#: The demo API's endpoints, one per paginator kind, as stream configs.
STREAMS: dict[str, dict[str, Any]] = {
    "next_url": {"path": "/db/items.json", "params": {"_size": 150}, "records": "rows",
                 "primary_key": ["id"], "cursor": {"field": "updated_at", "param": "updated_at__gte"},
                 "paginator": {"type": "next_url", "path": "next_url"}},
    "relative_next_url": {"path": "/next/items", "params": {"limit": 150}, "records": "data.items",
                          "primary_key": ["id"], "paginator": {"type": "next_url", "path": "next_url"}},
    "cursor": {"path": "/cursor/items", "params": {"limit": 150}, "records": "data.items",
               "primary_key": ["id"], "cursor": {"field": "updated_at", "param": "updated_at__gte"},
               "paginator": {"type": "cursor", "path": "meta.next", "param": "cursor"}},
    "link_header": {"path": "/link/items", "params": {"per_page": 150}, "primary_key": ["id"],
                    "paginator": {"type": "link_header"}},
    "offset": {"path": "/offset/items", "records": "results", "primary_key": ["id"],
               "paginator": {"type": "offset", "limit": 150}},
    "page_number": {"path": "/page/items", "params": {"size": 150}, "records": "items",
                    "primary_key": ["id"], "paginator": {"type": "page_number", "param": "page"}},
}  # fmt: skip


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """`pagesync ARGS` in a subprocess, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "pagesync.cli", *args],
        cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
