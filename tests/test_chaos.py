"""Chaos: one sync killed with SIGKILL over and over at seeded random points, then finished.

A stream of 2000 demo records, 40 a page, in six 5-day windows (54 pages, two windows at a
time), is synced by `pagesync run` processes: real processes running the real CLI, forked
by tests/chaos_entry.py from a parent that imported Prefect once (a fresh interpreter costs
2-3 s of imports per kill), with test state migrations to run. Each run is the resume of
the one before and is killed itself: at a crash point of the page cycle (before a request,
after the response, between the records' write and the checkpoint, inside the
checkpoint's transaction, after it), during partition planning, during a state migration,
or from outside while a request hangs on the wire (the demo API's slow fault: the request
is sent, the response has not come). After every kill the store must be consistent and
nothing may have moved backwards; after the last run every record is in the destination
exactly once.

Set PAGESYNC_CHAOS_SEED to try another kill sequence.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import database_url, run_cli, write_config
from helpers import assert_counters_match_log, assert_exactly_once, quoted, wait_for
from sqlalchemy import create_engine, inspect, text

from pagesync.demo.api import DemoAPI

SEED = int(os.environ.get("PAGESYNC_CHAOS_SEED", "20240601"))
ENTRY = str(Path(__file__).with_name("chaos_entry.py"))
PAGE = 40
STREAM = "chaos"
SPEC = {
    "path": "/cursor/items", "params": {"limit": PAGE}, "records": "data.items",
    "primary_key": ["id"], "cursor": {"field": "updated_at"},
    # Keyset tokens survive a crash: every resume starts at the exact page after the last
    # committed one, so a partition's records counter must equal its rows.
    "paginator": {"type": "cursor", "path": "meta.next", "param": "cursor", "stable_tokens": True},
    "partitions": {"type": "datetime", "start": "2024-01-01T00:00:00Z", "end": "2024-01-31T00:00:00Z",
                   "step": "P5D", "start_param": "updated_at__gte", "end_param": "updated_at__lt"},
}  # fmt: skip
#: Where a run is killed. `mid_request` is a SIGKILL from outside while a request hangs.
KINDS = (
    "plan", "migrate", "before_fetch", "mid_request", "after_fetch", "after_write",
    "in_commit", "after_commit",
)  # fmt: skip


def kill_plan(rng: random.Random, kills: int) -> list[tuple[str, int]]:
    """Every kind at least once, the rest drawn at random; N is the crash point's visit
    number (for `mid_request`: how many requests pass before the one that hangs)."""
    kinds = [*KINDS, *(rng.choice(KINDS) for _ in range(kills - len(KINDS)))]
    rng.shuffle(kinds)
    return [(k, 1 if k in ("plan", "migrate") else rng.randint(0 if k == "mid_request" else 1, 3))
            for k in kinds]  # fmt: skip


# -- what the store holds ------------------------------------------------------------------


@dataclass
class Snapshot:
    schema: int
    partitions: dict[str, dict[str, Any]]
    log: dict[int, tuple[Any, ...]]
    rows: dict[str, int]  # destination rows per partition
    ids: list[int]


def snapshot(url: str) -> Snapshot:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            schema = 0
            if "pagesync_meta" in tables:
                schema = int(conn.execute(text("SELECT value FROM pagesync_meta")).scalar() or 0)
            parts: dict[str, dict[str, Any]] = {}
            log: dict[int, tuple[Any, ...]] = {}
            if "pagesync_partitions" in tables:
                q = text("SELECT * FROM pagesync_partitions WHERE stream = :s")
                for r in conn.execute(q, {"s": STREAM}).mappings():
                    parts[r["partition"]] = {**r, "state": json.loads(r["state"])}
                q = text(
                    quoted(engine, "SELECT id, {partition}, page, records, cursor_after "
                           "FROM pagesync_pages")
                )  # fmt: skip
                log = {r[0]: tuple(r[1:]) for r in conn.execute(q)}
            rows: dict[str, int] = {}
            ids: list[int] = []
            if STREAM in tables:
                sql = f"SELECT {{_pagesync_partition}}, COUNT(*) FROM {{{STREAM}}} GROUP BY 1"
                rows = dict(conn.execute(text(quoted(engine, sql))).all())  # type: ignore[arg-type]
                sql = quoted(engine, f"SELECT id FROM {{{STREAM}}}")
                ids = list(conn.execute(text(sql)).scalars())
    finally:
        engine.dispose()
    return Snapshot(schema, parts, log, rows, ids)


def assert_consistent(s: Snapshot) -> None:
    """Counters equal the page log and the destination; each page committed once, in order."""
    assert len(s.ids) == len(set(s.ids)), "duplicate rows"
    pages: dict[str, list[int]] = {}
    for partition, page, _, _ in s.log.values():
        pages.setdefault(partition, []).append(page)
    for key, p in s.partitions.items():
        assert sorted(pages.get(key, [])) == list(range(1, p["pages"] + 1)), (key, pages.get(key))
        logged = sum(r[2] for r in s.log.values() if r[0] == key)
        assert p["records"] == logged == s.rows.get(key, 0), (key, p["records"], logged, s.rows)
        assert p["state"].get("page", 0) == p["pages"], (key, p["state"], p["pages"])
        if p["status"] == "complete":  # (a run killed while skipping it may hold its lease)
            assert p["state"].get("done") is True, (key, p)
    assert set(s.rows) <= set(s.partitions), "rows of a partition the store does not know"
    for migrated in (p["state"].get("migrated", []) for p in s.partitions.values()):
        assert migrated == sorted(set(migrated)), f"a migration applied twice: {migrated}"


def assert_not_backwards(before: Snapshot, after: Snapshot) -> None:
    """Nothing committed is lost or rewound: counters, page numbers, cursors, the page log."""
    assert after.schema >= before.schema
    for key, b in before.partitions.items():
        a = after.partitions.get(key)
        assert a is not None, f"partition {key} vanished"
        assert a["version"] >= b["version"], key
        assert a["pages"] >= b["pages"] and a["records"] >= b["records"], (key, b, a)
        assert a["state"].get("page", 0) >= b["state"].get("page", 0), (key, b["state"], a["state"])
        if b["state"].get("cursor") is not None:
            assert a["state"].get("cursor", "") >= b["state"]["cursor"], (key, b, a)
        if b["status"] == "complete":
            assert a["status"] == "complete" and a["pages"] == b["pages"], (key, b, a)
    for log_id, entry in before.log.items():
        assert after.log.get(log_id) == entry, f"page log row {log_id} changed or vanished"
    assert set(before.ids) <= set(after.ids), "committed rows vanished"


# -- runs ------------------------------------------------------------------------------------


class Runs:
    """`pagesync` processes forked by tests/chaos_entry.py (see there): a real process per
    run, without paying for Prefect's import each time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.log = open(folder / "chaos-entry.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, ENTRY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(300) == {"ready": True}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(
                f"chaos entry silent for {timeout}s; see {self.log.name}"
            ) from None

    def start(self, path: Path, env: dict[str, str]) -> tuple[int, Path]:
        """Start `pagesync run STREAM -c PATH`; its pid and the file its output goes to."""
        self.count += 1
        output = self.folder / f"run-{self.count}.out"
        request = {"args": ["run", STREAM, "-c", str(path)], "env": env, "output": str(output)}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._next(60)["pid"], output

    def wait(self, pid: int, timeout: float = 300) -> int:
        answer = self._next(timeout)
        assert answer["pid"] == pid, answer
        return answer["returncode"]

    def run(self, path: Path, env: dict[str, str]) -> tuple[int, str]:
        pid, output = self.start(path, env)
        code = self.wait(pid)
        return code, output.read_text()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    r = Runs(tmp_path)
    yield r
    r.close()


def kill_mid_request(
    runs: Runs, path: Path, api: DemoAPI, passed: int, env: dict[str, str]
) -> None:
    """SIGKILL the run while its (passed+1)-th request hangs on the wire."""
    api.clear_requests()
    api.add_fault(kind="slow", delay=60, after=passed, times=1, path="/cursor/items")
    pid, output = runs.start(path, env)
    try:
        wait_for(
            lambda: any(r["fault"] for r in api.requests) or runs.lines.qsize(),
            what="the hanging request",
        )
        assert not runs.lines.qsize(), (
            f"the run ended before its request hung: {output.read_text()}"
        )
        os.kill(pid, signal.SIGKILL)
        code = runs.wait(pid)
    finally:
        api.clear_faults()
    assert code == -signal.SIGKILL, output.read_text()


def run_chaos(tmp_path: Path, api: DemoAPI, runs: Runs, state: str, kills: int, label: str) -> str:
    path = write_config(tmp_path, api.url, {STREAM: SPEC}, state=state, source={"concurrency": 2})
    rng = random.Random(SEED)
    plan = kill_plan(rng, kills)
    target = 1  # pagesync's own schema version; each `migrate` kill adds a pending migration
    survived: Counter[str] = Counter()
    before = snapshot(state)
    started = time.monotonic()
    for i, (kind, n) in enumerate(plan):
        if kind == "migrate" and before.schema == target:
            target += 1
        env = {"PAGESYNC_CHAOS_SCHEMA": str(target)}
        where = f"kill {i + 1}/{len(plan)} ({kind}:{n}, seed {SEED})"
        if kind == "mid_request":
            kill_mid_request(runs, path, api, n, env)
        else:
            code, out = runs.run(path, {**env, "PAGESYNC_CRASH_AT": f"{kind}:{n}"})
            assert code == -signal.SIGKILL, (
                f"{where}: the run was not killed (exit {code}); the sync may have finished "
                f"early\n{out}"
            )
        after = snapshot(state)
        try:
            assert_consistent(after)
            assert_not_backwards(before, after)
            if kind == "migrate":  # rolled back whole: not one row touched
                assert after == before
        except AssertionError as e:
            raise AssertionError(f"after {where}: {e}") from e
        survived[kind] += 1
        before = after

    unfinished = sum(p["status"] != "complete" for p in before.partitions.values())
    assert unfinished or not before.partitions, "the sync finished before the last kill"
    code, out = runs.run(path, {"PAGESYNC_CHAOS_SCHEMA": str(target)})
    assert code == 0, out
    final = snapshot(state)
    assert_consistent(final)
    assert_not_backwards(before, final)
    assert_exactly_once(state, STREAM, [i["id"] for i in api.items])
    assert_counters_match_log(state, STREAM)
    assert len(final.partitions) == 6
    assert all(p["status"] == "complete" for p in final.partitions.values())
    assert all(p["lease_owner"] is None for p in final.partitions.values()), "a lease kept"
    assert sum(p["records"] for p in final.partitions.values()) == len(api.items)
    assert final.schema == target, "a migration did not run"
    pages = sum(p["pages"] for p in final.partitions.values())
    kinds = ", ".join(f"{k} {survived[k]}" for k in KINDS)
    line = (
        f"chaos ({label}, seed {SEED}): {sum(survived.values())} SIGKILLs survived ({kinds}); "
        f"{len(final.ids)} rows over {pages} pages, 0 lost, 0 duplicated, no checkpoint moved "
        f"backwards; {target - 1} migrations; {time.monotonic() - started:.0f}s"
    )
    return line


@pytest.mark.parametrize(
    ("store", "kills"), [("sqlite", 34), ("postgres", 16), ("duckdb", 16), ("mariadb", 16)]
)
def test_chaos_sigkill_at_random_points_then_resume(
    tmp_path: Path,
    api: DemoAPI,
    runs: Runs,
    store: str,
    kills: int,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = database_url(store, request, tmp_path, "chaos")
    label = {"sqlite": "SQLite", "postgres": "PostgreSQL", "duckdb": "DuckDB"}.get(store, "MariaDB")
    line = run_chaos(tmp_path, api, runs, state, kills=kills, label=label)
    with capsys.disabled():
        print(f"\n{line}")


# -- a reader while a run writes -------------------------------------------------------------

READER = """
import contextlib, io, json, sys, time
from pathlib import Path
from pagesync.core import store
from pagesync.cli.app import app

config, out, stop = sys.argv[1:]
with open(out, "w") as log:
    while not Path(stop).exists():
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                code = app(["state", "--json", "-c", config], standalone_mode=False)
            entry = {"ok": not code, "code": code, "views": json.loads(buf.getvalue())}
        except BaseException as e:
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        entry["at"] = time.monotonic()
        log.write(json.dumps(entry) + "\\n")
        log.flush()
        for engine in store._ENGINES.values():  # a fresh connection each time, as a new process
            engine.dispose()
        store._ENGINES.clear()
"""


def test_state_reader_during_a_run_never_fails_nor_sees_counters_go_down(
    tmp_path: Path, api: DemoAPI
) -> None:
    """`pagesync state --json` read in a loop by another process while a run commits (SQLite,
    WAL): every read succeeds, no partition's counters go down, and the run completes."""
    state = f"sqlite:///{tmp_path / 'pagesync.db'}"
    path = write_config(tmp_path, api.url, {STREAM: SPEC}, state=state, source={"concurrency": 2})
    api.add_fault(kind="slow", delay=0.05, times=-1, path="/cursor/items")  # a run of seconds
    reads, stop = tmp_path / "reads.jsonl", tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), str(reads), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: reads.exists() and reads.read_text().count("\n") >= 1, what="a first read")
        run = subprocess.Popen(
            [sys.executable, "-m", "pagesync.cli", "run", STREAM, "-c", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        cli_reads = []
        while run.poll() is None:  # meanwhile, the real command in processes of its own
            cli_reads.append(run_cli("state", "--json", "-c", str(path), timeout=120))
        out, _ = run.communicate()
        ended = time.monotonic()
        assert run.returncode == 0, out
    finally:
        stop.touch()
        reader_out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0, reader_out
    entries = [json.loads(line) for line in reads.read_text().splitlines()]
    failed = [e for e in entries if not e["ok"]]
    assert not failed, failed[:3]
    failed_cli = [r.stdout + r.stderr for r in cli_reads if r.returncode != 0]
    assert not failed_cli, failed_cli[:3]
    reader_views = [e["views"] for e in entries]
    cli_views = [json.loads(r.stdout) for r in cli_reads]
    for sequence in (reader_views, cli_views):  # each reader's reads, in the order made
        highest: dict[str, tuple[int, int]] = {}
        for view in sequence:
            for v in view:
                pages, records = highest.get(v["partition"], (0, 0))
                assert v["pages"] >= pages and v["records"] >= records, (pages, records, v)
                highest[v["partition"]] = (v["pages"], v["records"])
    total = len(api.items)
    during = [sum(v["records"] for v in e["views"]) for e in entries if e["at"] <= ended] + [
        sum(v["records"] for v in view) for view in cli_views
    ]
    assert any(0 < n < total for n in during), "no read saw the run in progress"
    assert len(set(during)) >= 5, f"reads did not interleave with the run's commits: {during}"
    engine = create_engine(state)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    assert_exactly_once(state, STREAM, [i["id"] for i in api.items])
    assert_counters_match_log(state, STREAM)
    print(f"{len(entries)} reader reads and {len(cli_reads)} `pagesync state --json` runs")
