"""`fan_out: deployment` throughput: one stream's partitions over 1 worker, then over N.

    .venv/bin/python bench/scale.py                       # 40 partitions, 50 ms, 1 vs 3
    .venv/bin/python bench/scale.py --workers 1,2,3 --rounds 2

A Prefect server on a PostgreSQL database of its own, a process work pool, the demo API in
its own process answering every request 50 ms late, the store and destination in a fresh
PostgreSQL schema per run. Workers are started and seen online before the clock starts;
the time is `pagesync run` (the coordinator) from start to exit, so it includes every child
flow run's process start, which is what a worker pays per batch of partitions.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    BENCH,
    DemoAPIProcess,
    Postgres,
    partitioned_stream,
    plain_env,
    write_config,
)

from pagesync.prefect.local_server import free_port, wait_until_healthy  # noqa: E402

POOL = "bench-scale"


class PostgresPrefect:
    """`prefect server start` on a database of its own, dropped afterwards."""

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg
        self.db = f"prefect_bench_{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> PostgresPrefect:
        with self.pg.connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        home = BENCH / ".prefect-home-scale"
        home.mkdir(exist_ok=True)
        host = self.pg.conninfo.split("://", 1)[1].rsplit("/", 1)[0]
        env = {
            **plain_env(), "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{host}/{self.db}",
        }  # fmt: skip
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        with (home / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until_healthy(self.url, self.proc, 300, "the Prefect server", home / "server.log")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        with self.pg.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return {
            **plain_env(), "PREFECT_API_URL": self.url, "PREFECT_HOME": str(home),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
        }  # fmt: skip

    def online_workers(self) -> int:
        r = httpx.post(f"{self.url}/work_pools/{POOL}/workers/filter", json={}, timeout=10)
        return sum(w.get("status") == "ONLINE" for w in r.json())


def run_once(
    server: PostgresPrefect,
    pg: Postgres,
    api: DemoAPIProcess,
    workers: int,
    args: argparse.Namespace,
) -> float:
    """Seconds the coordinator takes with `workers` workers up."""
    work = BENCH / ".scale" / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    with pg.schema() as schema:
        stream = partitioned_stream(args.page_size, args.partitions)
        stream.update(fan_out="deployment", fan_out_batch=args.batch)
        config = write_config(
            work / "pagesync.yaml", base_url=api.url, streams={"items": stream},
            state=pg.sqlalchemy_url(schema), concurrency=args.batch,
        )  # fmt: skip
        env = server.env(work / "client")
        subprocess.run(
            [sys.executable, "-m", "pagesync.cli", "deploy", "--pool", POOL, "-c", str(config)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        procs = []
        try:
            for i in range(workers):
                folder = work / f"w{i}"
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "prefect",
                            "worker",
                            "start",
                            "--pool",
                            POOL,
                            "--limit",
                            str(args.limit),
                            "--name",
                            f"{work.name}-{i}",
                        ],
                        cwd=work,
                        env=server.env(folder),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                )
            deadline = time.monotonic() + 120
            while server.online_workers() < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not come online")
                time.sleep(0.5)
            api.forget_requests()
            began = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(config)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            took = time.monotonic() - began
            if done.returncode != 0:
                raise RuntimeError(f"the run failed:\n{done.stdout}\n{done.stderr}")
            records = pg.count(schema)
            print(f"  {workers} worker(s): {took:.1f} s, {records} records, "
                  f"{len(api.request_times())} requests", flush=True)  # fmt: skip
            return took
        finally:
            for p in procs:
                try:
                    tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for q in tree:
                    q.kill()
                psutil.wait_procs(tree, timeout=10)
            # Workers killed here stay ONLINE in the server until their heartbeat lapses.
            for w in httpx.post(
                f"{server.url}/work_pools/{POOL}/workers/filter", json={}, timeout=10
            ).json():
                httpx.delete(f"{server.url}/work_pools/{POOL}/workers/{w['name']}", timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--partitions", type=int, default=40)
    parser.add_argument("--page-size", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--workers", default="1,3")
    parser.add_argument("--batch", type=int, default=2, help="fan_out_batch")
    parser.add_argument("--limit", type=int, default=2, help="child flow runs per worker")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    pg = Postgres(args.postgres)
    with PostgresPrefect(pg) as server, DemoAPIProcess(2000) as api:
        api.set_latency(args.latency)
        subprocess.run(
            [sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
            env=server.env(BENCH / ".scale" / "admin"), check=True, capture_output=True,
        )  # fmt: skip
        times: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                times[n].append(run_once(server, pg, api, n, args))
    medians = {n: statistics.median(t) for n, t in times.items()}
    print(f"{args.partitions} partitions, page size {args.page_size}, {args.latency * 1000:g} ms "
          f"a request, batch {args.batch}, {args.limit} child runs per worker")  # fmt: skip
    for n, m in medians.items():
        print(f"  {n} worker(s): median {m:.1f} s")
    base = medians[counts[0]]
    for n in counts[1:]:
        print(f"  {n} workers vs {counts[0]}: {base / medians[n]:.2f}x")


if __name__ == "__main__":
    main()
