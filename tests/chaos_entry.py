"""The chaos test's way of starting `pagesync` processes: the real CLI, minus the imports.

Importing Prefect costs 2-3 s a process on a busy 2-core machine, and the chaos test kills
dozens of runs. `python tests/chaos_entry.py serve` imports pagesync and Prefect once and
then, for each JSON request on stdin, forks a child that runs `pagesync.cli.main()` with
the request's arguments and environment, exactly as `pagesync ARGS` would. It answers with
the child's pid (so the test can SIGKILL it) and then its exit status (negative: killed by
that signal). Each child is a real process; crash points (PAGESYNC_CRASH_AT) and signals
act on it alone.

Before the CLI runs, one test migration is registered per schema version above pagesync's
own, up to $PAGESYNC_CHAOS_SCHEMA: migration v -> v+1 appends v+1 to the `migrated` list
in every partition's state through `patch_all_states`, so a migration applied twice, or
half applied, shows in the state.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from sqlalchemy.engine import Connection

from pagesync.core import mergepatch, store

BASE_SCHEMA = store.SCHEMA_VERSION
BASE_MIGRATIONS = list(store.MIGRATIONS)


def mark(version: int) -> store.Migration:
    """The migration to `version`: a merge patch that records it in each partition's state."""

    def step(conn: Connection) -> None:
        def patch(state: dict[str, Any]) -> dict[str, Any]:
            migrated = [*state.get("migrated", []), version]
            return mergepatch.diff(state, {**state, "migrated": migrated})

        store.patch_all_states(conn, patch)

    return step


def install(target: int) -> None:
    """Make `target` the current schema version, with a test migration to each version."""
    store.MIGRATIONS[:] = BASE_MIGRATIONS
    for version in range(len(BASE_MIGRATIONS) + 1, target + 1):
        store.MIGRATIONS.append(mark(version))
    store.SCHEMA_VERSION = max(BASE_SCHEMA, target)


def child(request: dict[str, Any]) -> None:
    """In the forked child: run the CLI as `pagesync ARGS`, then exit with its code."""
    os.environ.update(request.get("env", {}))
    fd = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from pagesync.core import crashpoints

    crashpoints.load()  # this run's PAGESYNC_CRASH_AT
    install(int(os.environ.get("PAGESYNC_CHAOS_SCHEMA", BASE_SCHEMA)))
    from pagesync.cli import main

    sys.argv = ["pagesync", *request["args"]]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """Fork a child per request line; answer {"pid": N}, then {"pid": N, "returncode": R}."""
    # What a run imports, imported once here (the CLI sets the console level before Prefect).
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
    import duckdb_engine  # noqa: F401
    import prefect.artifacts  # noqa: F401
    import prefect.blocks.system  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import psycopg  # noqa: F401
    import pymysql  # noqa: F401
    import sqlalchemy.dialects.mysql.pymysql  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
    import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401

    import pagesync.cli  # noqa: F401
    import pagesync.cli.deploy  # noqa: F401
    import pagesync.cli.launch  # noqa: F401
    import pagesync.cli.progress  # noqa: F401
    import pagesync.flows  # noqa: F401
    import pagesync.tasks  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
