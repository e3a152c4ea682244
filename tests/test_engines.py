"""DuckDB and MariaDB end to end: the demo streams synced through a real Prefect server,
exactly once, by many partitions in threads of one process; and what each engine refuses
(a second process on one DuckDB file, a MariaDB text key longer than its VARCHAR)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STREAMS, daily_stream, database_url, run_cli, write_config
from helpers import assert_counters_match_log, assert_exactly_once, partition_rows, rows, wait_for

from pagesync.core.destination import Destination
from pagesync.core.errors import ExtractError
from pagesync.core.store import _ENGINES, engine_for
from pagesync.demo.api import DemoAPI


def sync(path: Path, stream: str, **kw: object) -> dict:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), **kw)


@pytest.mark.parametrize("mode", ["same", "separate"])
@pytest.mark.parametrize("engine", ["duckdb", "mariadb"])
def test_demo_streams_sync_exactly_once(
    tmp_path: Path, api: DemoAPI, engine: str, mode: str, request: pytest.FixtureRequest
) -> None:
    """31 daily partitions, 4 at a time in threads of one process, and a single-partition
    stream; the same database for state and records, or the records in a database of
    their own (state in SQLite); then a full refresh that upserts everything again."""
    db = database_url(engine, request, tmp_path)
    state = db if mode == "same" else f"sqlite:///{tmp_path / 'state.db'}"
    streams = {"daily": daily_stream(20), "items": STREAMS["cursor"]}
    path = write_config(
        tmp_path, api.url, streams, state=state, destination=None if mode == "same" else db,
        source={"concurrency": 4},
    )  # fmt: skip
    ids = [i["id"] for i in api.items]
    january = [i["id"] for i in api.items if i["updated_at"].startswith("2024-01")]
    daily = sync(path, "daily")
    assert daily["complete"] == 31 and daily["records"] == len(january)
    assert_exactly_once(db, "daily", january)
    assert_counters_match_log(state, "daily")
    assert {p["status"] for p in partition_rows(state, "daily")} == {"complete"}

    sync(path, "items")
    sync(path, "items", full_refresh=True)  # everything again: replaced, not duplicated
    assert_exactly_once(db, "items", ids)
    assert_counters_match_log(state, "items")
    by_id = {r["id"]: r for r in rows(db, "items")}
    source = api.items[7]
    row = by_id[source["id"]]
    assert row["name"] == source["name"] and row["price"] == source["price"]
    attrs = row["attrs"] if isinstance(row["attrs"], dict) else json.loads(row["attrs"])
    assert attrs == source["attrs"]


def test_duckdb_file_is_one_process_at_a_time(tmp_path: Path, api: DemoAPI) -> None:
    """DuckDB locks its file for one writing process: a second `pagesync run` on a file
    another process holds fails at once, naming the file, and writes nothing."""
    db = tmp_path / "p.duckdb"
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]}, state=f"duckdb:///{db}")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(db)!r}); "
         "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        wait_for(lambda: holder.stdout.readline().strip() == "ready", what="the holder")
        result = run_cli("run", "items", "-c", str(path))
    finally:
        holder.communicate("", timeout=30)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "lock" in out.lower() and str(db) in out, out
    assert not api.requests, "nothing is fetched before the store is open"
    result = run_cli("run", "items", "-c", str(path))  # once the other process is gone
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(f"duckdb:///{db}", "items", [i["id"] for i in api.items])


def test_mariadb_text_keys_fit_innodb_and_longer_values_are_refused(mysql_url: str) -> None:
    """Text primary keys are VARCHARs that together fit InnoDB's 3072-byte key in utf8mb4:
    255 characters for one or three key columns, 192 each for four. A longer value fails
    its page with an error naming the stream, the field and the limit."""
    dest = Destination(engine_for(mysql_url))
    try:
        with dest.engine.begin() as conn:
            dest.write(conn, "one", ["code"], [{"code": "é" * 255, "n": 1}], partition="p", page=1)
            four = {k: "x" * 192 for k in "abcd"}
            dest.write(conn, "four", list("abcd"), [four], partition="p", page=1)
        assert dest.count("one") == 1 and dest.count("four") == 1
        assert dest.tables["one"].columns["code"] == "VARCHAR(255)"
        assert dest.tables["four"].columns["a"] == "VARCHAR(192)"
        with pytest.raises(ExtractError, match=r"stream one: primary key field 'code' .* 256 "
                           r"characters.*VARCHAR\(255\)") as info, dest.engine.begin() as conn:  # fmt: skip
            dest.write(conn, "one", ["code"], [{"code": "y" * 256}], partition="p", page=2)
        assert not info.value.transient
        assert dest.count("one") == 1
    finally:
        _ENGINES.pop(mysql_url).dispose()


def test_relative_duckdb_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    from pagesync.core.config import load_config

    path = write_config(
        tmp_path, "http://127.0.0.1:9", {"items": STREAMS["cursor"]},
        state="duckdb:///state.duckdb", destination="duckdb:///data/warehouse.duckdb",
    )  # fmt: skip
    config = load_config(path)
    assert config.state == f"duckdb:///{tmp_path.resolve() / 'state.duckdb'}"
    assert config.destination_url == f"duckdb:///{tmp_path.resolve() / 'data/warehouse.duckdb'}"
    kept = write_config(tmp_path, "http://127.0.0.1:9", {"items": STREAMS["cursor"]},
                        state="duckdb:///:memory:")  # fmt: skip
    assert load_config(kept).state == "duckdb:///:memory:"
