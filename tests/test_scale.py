"""`fan_out: deployment` across real Prefect workers, one of them SIGKILLed mid-partition.

Real parts only: a `prefect server start` on a PostgreSQL database of its own, a process
work pool, three `prefect worker start` processes (each its own PREFECT_HOME and working
folder), the checkpoint store and destination on PostgreSQL, the demo API at 20 ms a
request. A 40-partition stream runs through a coordinator (`pagesync run`); when a worker's
child flow run holds a partition with committed pages, the worker and its children are
SIGKILLed. The stream must still complete, exactly, with the killed partitions resumed
from their committed page, nothing left Running in Prefect, and the source's rate limit
held across every worker (the API's own request log, per second).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import PG_ADMIN_URL, daily_stream, run_cli, write_config
from helpers import assert_exactly_once, wait_for
from sqlalchemy import create_engine, text

from pagesync.demo.api import DemoAPI
from pagesync.prefect.local_server import free_port, wait_until_healthy

pytestmark = [pytest.mark.scale, pytest.mark.postgres]

RATE = 25  # requests a second, over all workers
TTL = 3  # seconds: the lease TTL of the source
WORKERS = 3
START, END = "2024-01-01T00:00:00Z", "2024-01-31T00:00:00Z"  # 40 windows of 18 hours


@pytest.fixture(scope="module")
def prefect_pg() -> Iterator[str]:
    """A Prefect server of this module's own, on its own PostgreSQL database."""
    import psycopg

    name = f"prefect_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    home = Path(tempfile.mkdtemp(prefix="pagesync-scale-server-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    host = PG_ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]
    env = {
        **_clean_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{host}/{name}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_healthy(url, proc, 240, "the scale test's Prefect server", home / "server.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clean_env() -> dict[str, str]:
    """The environment without the session server's Prefect settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}


def _client_env(url: str, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        **_clean_env(),
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
    }


def _worker(name: str, folder: Path, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "scale", "--name", name]
    return subprocess.Popen(
        [*cmd, "--limit", "2"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _pool(url: str, folder: Path) -> dict[str, str]:
    """The client environment, with the `scale` process pool made (once per server)."""
    env = _client_env(url, folder / "client")
    if httpx.get(f"{url}/work_pools/scale", timeout=30).status_code == 404:
        cmd = [sys.executable, "-m", "prefect", "work-pool", "create", "scale"]
        made = subprocess.run(
            [*cmd, "--type", "process"], env=env, capture_output=True, text=True, timeout=120
        )
        assert made.returncode == 0, made.stderr
    return env


def _owner_pid(owner: str | None) -> int | None:
    """host:pid:flow-run -> pid."""
    if not owner:
        return None
    pid = owner.split(":")[1]
    return int(pid) if pid.isdigit() else None


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)


def _flow_runs(url: str, **filters: Any) -> list[dict[str, Any]]:
    return httpx.post(f"{url}/flow_runs/filter", json=filters, timeout=30).json()


def _task_runs(url: str, **filters: Any) -> list[dict[str, Any]]:
    return httpx.post(f"{url}/task_runs/filter", json=filters, timeout=30).json()


def test_fan_out_across_workers_survives_a_sigkilled_worker(
    prefect_pg: str, pg_url: str, tmp_path: Path
) -> None:
    url = prefect_pg
    stream = {
        **daily_stream(5),
        "fan_out": "deployment",
        "fan_out_batch": 2,
    }
    stream["partitions"] = {**stream["partitions"], "start": START, "end": END, "step": "PT18H"}
    with DemoAPI(items=2000) as api:
        api.add_fault(kind="slow", delay=0.02, times=-1)
        config = write_config(
            tmp_path, api.url, {"items": stream}, state=pg_url,
            source={"rate_limit": {"per_second": RATE}, "lease_ttl": TTL, "concurrency": 2},
        )  # fmt: skip
        env = _pool(url, tmp_path)
        deployed = run_cli("deploy", "--pool", "scale", "-c", str(config), **env)
        assert deployed.returncode == 0, deployed.stderr
        assert "pagesync-partitions/partitions" in deployed.stdout
        assert "pagesync-rate-shop" in deployed.stdout

        workers: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            for i in range(WORKERS):
                folder = tmp_path / f"worker{i}"
                wenv = _client_env(url, folder / "home")
                log = open(folder / "worker.log", "wb")  # noqa: SIM115
                logs.append(log)
                workers.append(_worker(f"w{i}", folder, wenv, log))
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(config)],
                cwd=tmp_path, env=_client_env(url, tmp_path / "coordinator"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            watch = _Watch(pg_url, workers)
            deadline = time.monotonic() + 420  # ~100 s on a quiet machine
            while coordinator.poll() is None:
                if time.monotonic() > deadline:
                    _kill_tree(coordinator.pid)
                    out, err = coordinator.communicate()
                    raise AssertionError(
                        f"the coordinator did not finish in time\n{out}\n{err}\n"
                        f"{_diagnosis(url, pg_url, watch)}\n{_tails(tmp_path)}"
                    )
                watch.look()
                time.sleep(0.1)  # a sampling period, not synchronisation: the loop polls
            out, err = coordinator.communicate()
            assert coordinator.returncode == 0, f"{out}\n{err}\n{_tails(tmp_path)}"
            assert watch.killed is not None, "no worker was killed while it held a partition"
        finally:
            for w in workers:
                _kill_tree(w.pid)
            for log in logs:
                log.close()
        requests = api.requests
        expected = [
            it["id"] for it in api.items
            if START <= it["updated_at"] < END
        ]  # fmt: skip

    engine = create_engine(pg_url)
    with engine.connect() as conn:
        parts = conn.execute(text("SELECT * FROM pagesync_partitions")).mappings().all()
        pages = conn.execute(text("SELECT * FROM pagesync_pages ORDER BY id")).mappings().all()
    engine.dispose()

    # Every partition complete, every record once.
    assert len(parts) == 40
    assert {p["status"] for p in parts} == {"complete"}
    assert_exactly_once(pg_url, "items", expected)

    # Partitions ran on more than one worker.
    by_run = {p["flow_run_id"] for p in pages}
    workers_used = {watch.worker_of[r] for r in by_run if r in watch.worker_of}
    assert len(workers_used) >= 2, workers_used

    # No two runners on one partition at once; each page committed once.
    per_partition: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in pages:
        per_partition[p["partition"]].append(p)
    for key, rows in per_partition.items():
        assert [r["page"] for r in rows] == list(range(1, len(rows) + 1)), key
        spans = defaultdict(list)
        for r in rows:
            spans[r["flow_run_id"]].append(r["committed_at"])
        intervals = sorted((min(v), max(v)) for v in spans.values())
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            assert start > end, f"partition {key}: two runners at once"

    # The killed partitions resumed from their committed page: after the kill, no request
    # for their window asked for the window's start again (page 1), and their pages went on
    # from the committed one under another flow run.
    victim, held = watch.killed
    assert held, "the killed child held no partition with committed pages"
    for key, (committed_page, window_start, window_end) in held.items():
        later = [
            r for r in requests
            if r["at"] > watch.killed_at and r["query"].get("updated_at__lt") == window_end
        ]  # fmt: skip
        assert later, f"partition {key}: never resumed"
        assert all(r["query"].get("updated_at__gte") != window_start for r in later), key
        after = [r for r in per_partition[key] if r["flow_run_id"] != victim]
        assert after[0]["page"] == committed_page + 1, key

    # Nothing stays Running: the killed child flow run ended Crashed, its task runs too.
    busy = {"type": {"any_": ["RUNNING", "PENDING", "CANCELLING"]}}
    assert _flow_runs(url, flow_runs={"state": busy}) == []
    left = _task_runs(url, task_runs={"state": busy})
    assert left == [], [(t["name"], t["flow_run_id"], t["state_type"], victim) for t in left] + [
        err
    ]
    (dead,) = _flow_runs(url, flow_runs={"id": {"any_": [victim]}})
    assert dead["state_type"] == "CRASHED"

    # The rate limit held across all workers, per second of the API's own log.
    per_second: dict[int, int] = defaultdict(int)
    for r in requests:
        per_second[int(r["at"])] += 1
    assert max(per_second.values()) <= RATE, sorted(per_second.items())


class _Watch:
    """Samples the store while the run goes: which worker each child flow run runs on, and
    the moment to kill one (its child holds a partition with committed pages)."""

    def __init__(self, pg_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
        self.engine = create_engine(pg_url)
        self.workers = workers
        self.worker_of: dict[str, int] = {}
        self.killed: tuple[str, dict[str, tuple[int, str, str]]] | None = None
        self.killed_at = 0.0

    def _children(self) -> dict[int, int]:
        """pid -> worker index, for every live descendant of a live worker."""
        out = {}
        for i, w in enumerate(self.workers):
            try:
                for c in psutil.Process(w.pid).children(recursive=True):
                    out[c.pid] = i
            except psutil.NoSuchProcess:
                continue
        return out

    def look(self) -> None:
        with self.engine.connect() as conn:
            try:
                rows = conn.execute(text("SELECT * FROM pagesync_partitions")).mappings().all()
            except Exception:  # not migrated yet
                return
        children = self._children()
        for r in rows:
            pid = _owner_pid(r["lease_owner"])
            if pid in children:
                self.worker_of[r["lease_owner"].split(":")[2]] = children[pid]
        if self.killed is not None:
            return
        for r in rows:
            pid = _owner_pid(r["lease_owner"])
            if r["status"] == "running" and r["pages"] >= 2 and pid in children:
                self._kill(children[pid], r["lease_owner"].split(":")[2])
                return

    def _kill(self, worker: int, flow_run: str) -> None:
        _kill_tree(self.workers[worker].pid)
        self.killed_at = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM pagesync_partitions")).mappings().all()
        # A window's key is `start..end`, as its requests' updated_at__gte/__lt carry it.
        held = {
            r["partition"]: (r["pages"], *r["partition"].split(".."))
            for r in rows
            if (r["lease_owner"] or "").endswith(f":{flow_run}") and r["pages"] >= 1
        }
        self.killed = (flow_run, held)


def _diagnosis(url: str, pg_url: str, watch: _Watch) -> str:
    """Where a run that did not finish stood: its flow runs' states, its partitions'."""
    runs = [(fr["name"], fr["state_type"], fr["id"]) for fr in _flow_runs(url)]
    parts = _unfinished(pg_url, "partition, status, pages, lease_owner")
    return f"killed: {watch.killed}\nflow runs: {runs}\nunfinished partitions: {parts}"


def _unfinished(pg_url: str, columns: str) -> list[Any]:
    """These columns of every partition row that is not complete."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(
                f"SELECT {columns} FROM pagesync_partitions WHERE status <> 'complete'"
            )).all())  # fmt: skip
    finally:
        engine.dispose()


def _tails(folder: Path) -> str:
    out = []
    for log in sorted(folder.glob("worker*/worker.log")):
        out.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(out)


def test_a_failed_partition_fails_the_stream_and_a_rerun_submits_only_it(
    prefect_pg: str, pg_url: str, tmp_path: Path
) -> None:
    """The coordinator ends with the partition's error (exit 1); run again, it submits only
    the incomplete partition, which resumes, and the stream completes."""
    url = prefect_pg
    stream = {**daily_stream(50), "fan_out": "deployment", "fan_out_batch": 2}
    stream["partitions"] = {**stream["partitions"], "start": START, "end": "2024-01-05T00:00:00Z"}
    with DemoAPI(items=2000) as api:
        # The first request answers 400 (not retried): whichever partition asked ends
        # incomplete. The first, because it is always a first page: a later one may be a
        # next page fetched ahead, which a page retried for another reason drops unread.
        api.add_fault(kind="status", status=400, times=1, after=0, path="/next/items")
        config = write_config(tmp_path, api.url, {"days": stream}, state=pg_url)
        with _one_worker("solo", url, config, tmp_path) as env:
            first = run_cli("run", "days", "-c", str(config), cwd=tmp_path, **env)
            assert first.returncode == 1, first.stdout + first.stderr
            failed = _unfinished(pg_url, "partition, error")
            assert len(failed) == 1 and "HTTP 400" in failed[0].error
            assert f"partition {failed[0].partition}" in first.stderr
            began = time.time()
            second = run_cli("run", "days", "-c", str(config), cwd=tmp_path, **env)
            assert second.returncode == 0, second.stdout + second.stderr
        expected = [it["id"] for it in api.items if START <= it["updated_at"] < "2024-01-05"]
    assert_exactly_once(pg_url, "days", expected)
    children = [
        fr for fr in _flow_runs(url, flow_runs={"name": {"like_": "days ·"}})
        if fr["parameters"].get("stream") == "days"
    ]  # fmt: skip
    later = [
        fr for fr in children
        if datetime.fromisoformat(fr["created"].replace("Z", "+00:00")).timestamp() > began
    ]  # fmt: skip
    assert [p["key"] for fr in later for p in fr["parameters"]["partitions"]] == [
        failed[0].partition
    ]


def test_stopping_the_coordinator_cancels_its_children(
    prefect_pg: str, pg_url: str, tmp_path: Path
) -> None:
    """SIGTERM to the coordinator: it cancels its child flow runs, whose worker stops them
    (Cancelled, not Running), and exits 143 with committed pages kept."""
    url = prefect_pg
    stream = {**daily_stream(2), "fan_out": "deployment", "fan_out_batch": 2}
    stream["partitions"] = {**stream["partitions"], "start": START, "end": "2024-01-03T00:00:00Z"}
    with DemoAPI(items=2000) as api:
        api.add_fault(kind="slow", delay=1.0, times=-1)  # ~34 s a partition: stopped midway
        config = write_config(tmp_path, api.url, {"slow": stream}, state=pg_url)
        with _one_worker("stopper", url, config, tmp_path) as env:
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "pagesync.cli", "run", "slow", "-c", str(config)],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip

            def children(*states: str) -> list[dict[str, Any]]:
                runs = _flow_runs(url, flow_runs={"name": {"like_": "slow ·"}})
                return [fr for fr in runs if not states or fr["state_type"] in states]

            wait_for(lambda: children("RUNNING"), timeout=120, what="a running child")
            wait_for(lambda: committed(pg_url) > 0, timeout=60, what="a committed page")
            coordinator.send_signal(signal.SIGTERM)
            out, err = coordinator.communicate(timeout=120)
            assert coordinator.returncode == 143, out + err
            wait_for(
                lambda: all(fr["state_type"] == "CANCELLED" for fr in children()),
                timeout=90, what="every child flow run Cancelled",
            )  # fmt: skip
    assert committed(pg_url) > 0  # kept


@contextlib.contextmanager
def _one_worker(name: str, url: str, config: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The config's deployments registered on the `scale` pool and one worker serving it:
    yields the environment runs are started with; the worker and its runs die after."""
    env = _pool(url, tmp_path)
    assert run_cli("deploy", "--pool", "scale", "-c", str(config), **env).returncode == 0
    folder = tmp_path / "worker"
    folder.mkdir()
    with open(folder / "worker.log", "wb") as log:
        worker = _worker(name, folder, _client_env(url, folder / "home"), log)
        try:
            yield env
        finally:
            _kill_tree(worker.pid)


def committed(pg_url: str) -> int:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pagesync_pages")).scalar() or 0
    except Exception:  # not migrated yet
        return 0
    finally:
        engine.dispose()


def test_a_replace_stream_fanned_out_swaps_in_once_its_children_are_done(
    prefect_pg: str, pg_url: str, tmp_path: Path
) -> None:
    """write_disposition: replace with fan_out: deployment: the children write into the
    coordinator's refresh (one staging table), and the coordinator swaps it in at the end."""
    url = prefect_pg
    stream = {**daily_stream(100), "fan_out": "deployment", "fan_out_batch": 2,
              "write_disposition": "replace"}  # fmt: skip
    stream["partitions"] = {**stream["partitions"], "start": START, "end": "2024-01-05T00:00:00Z"}
    with DemoAPI(items=2000) as api:
        config = write_config(tmp_path, api.url, {"days": stream}, state=pg_url)
        env = _pool(url, tmp_path)
        assert run_cli("deploy", "--pool", "scale", "-c", str(config), **env).returncode == 0
        folder = tmp_path / "worker"
        folder.mkdir()

        def in_range() -> list[int]:
            return [it["id"] for it in api.items if START <= it["updated_at"] < "2024-01-05"]

        with open(folder / "worker.log", "wb") as log:
            worker = _worker("solo", folder, _client_env(url, folder / "home"), log)
            try:
                first = run_cli("run", "days", "-c", str(config), cwd=tmp_path, **env)
                assert first.returncode == 0, first.stdout + first.stderr
                assert_exactly_once(pg_url, "days", in_range())
                api.delete_items(in_range()[:40])
                second = run_cli("run", "days", "-c", str(config), cwd=tmp_path, **env)
                assert second.returncode == 0, second.stdout + second.stderr
            finally:
                _kill_tree(worker.pid)
        assert_exactly_once(pg_url, "days", in_range())  # the 40 deleted ones are gone
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        refreshes = conn.execute(text("SELECT DISTINCT state FROM pagesync_partitions")).scalars()
        ids = {json.loads(s)["refresh"] for s in refreshes}
        staged = conn.execute(text("SELECT to_regclass('days__pagesync_staging')")).scalar()
    engine.dispose()
    assert len(ids) == 1 and staged is None  # one refresh over all children, swapped in
