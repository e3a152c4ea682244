"""write_disposition: append: every record inserted once per run, with no primary key,
also when a run is killed midway and resumed (real `pagesync run` processes, SIGKILL)."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, database_url, run_cli, write_config
from helpers import committed_pages, rows

from pagesync.demo.api import DemoAPI


def append_stream(**extra: Any) -> dict[str, Any]:
    """The datasette-shaped stream, 100 records a page (pages end inside groups of records
    sharing an `updated_at`, so a resume by cursor re-reads records already written)."""
    spec = {k: v for k, v in STREAMS["next_url"].items() if k != "primary_key"}
    return {**spec, "params": {"_size": 100}, "write_disposition": "append", **extra}


def counts(db: str) -> Counter[int]:
    return Counter(r["id"] for r in rows(db, "items"))


@pytest.mark.parametrize("point", ["after_fetch", "after_write", "in_commit", "after_commit"])
@pytest.mark.parametrize("same_db", [True, False], ids=["same-db", "own-destination"])
def test_an_append_stream_killed_midway_lands_every_record_once(
    tmp_path: Path, api: DemoAPI, point: str, same_db: bool
) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    dest = state if same_db else f"sqlite:///{tmp_path / 'dest.db'}"
    path = write_config(tmp_path, api.url, {"items": append_stream()}, state=state,
                        destination=None if same_db else dest)  # fmt: skip
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT=f"{point}:5")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert committed_pages(state, "items") >= 4
    if not same_db and point in ("after_write", "in_commit"):
        assert sum(counts(dest).values()) > 4 * 100  # a page written, never checkpointed
    done = run_cli("run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    got = counts(dest)
    assert set(got) == {i["id"] for i in api.items}, "records lost"
    assert max(got.values()) == 1, (
        f"records appended twice: {[k for k, v in got.items() if v > 1][:5]}"
    )
    assert len({r["_pagesync_load"] for r in rows(dest, "items")}) == 1  # one walk, resumed


@pytest.mark.parametrize("engine", ["duckdb", "mariadb", "postgres"])
def test_an_append_stream_killed_in_its_commit_lands_every_record_once_on_every_engine(
    tmp_path: Path, api: DemoAPI, engine: str, request: pytest.FixtureRequest
) -> None:
    """The same on the other engines, state and records in one database: killed inside
    the checkpoint's transaction, resumed from the cursor."""
    db = database_url(engine, request, tmp_path)
    path = write_config(tmp_path, api.url, {"items": append_stream()}, state=db)
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="in_commit:5")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    done = run_cli("run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    got = counts(db)
    assert set(got) == {i["id"] for i in api.items} and set(got.values()) == {1}


def test_each_run_appends_again_and_the_table_has_no_key(tmp_path: Path, api: DemoAPI) -> None:
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    path = write_config(tmp_path, api.url, {"items": append_stream()}, state=db)
    for _ in range(2):
        result = run_cli("run", "items", "-c", str(path), "--full-refresh")
        assert result.returncode == 0, result.stdout + result.stderr
    got = counts(db)
    assert set(got) == {i["id"] for i in api.items} and set(got.values()) == {2}
    assert len({r["_pagesync_load"] for r in rows(db, "items")}) == 2


def test_a_stream_without_primary_key_must_say_append(tmp_path: Path, api: DemoAPI) -> None:
    spec = {k: v for k, v in STREAMS["next_url"].items() if k != "primary_key"}
    path = write_config(tmp_path, api.url, {"items": spec})
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "streams.items" in result.stderr and "write_disposition: append" in result.stderr
