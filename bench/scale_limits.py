"""What one PostgreSQL store and one Prefect server carry (docs/scale.md).

    .venv/bin/python bench/scale_limits.py --only commits   # checkpoint commits/s
    .venv/bin/python bench/scale_limits.py --only events    # page task runs/s the server records

commits: N threads, each holding the lease of a partition of its own, commit checkpoints
with one page-log row each (`Store.commit`, the statement pair of every page) into a fresh
PostgreSQL schema, for a fixed time; commits per second over all threads.

events: `pagesync run` of a stream with many small pages, no API latency, against a
Prefect server on PostgreSQL; the server records each page's task run from its state
events. The figure is task runs recorded per second: from the run's start until the
server's count of task runs stops growing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, DemoAPIProcess, Postgres, partitioned_stream, write_config  # noqa: E402
from scale import PostgresPrefect  # noqa: E402

from pagesync.core.store import Store  # noqa: E402


def commits(pg: Postgres, threads: int, seconds: float) -> float:
    with pg.schema() as schema:
        store = Store(pg.sqlalchemy_url(schema), lease_ttl=60)
        store.migrate()
        keys = [f"p{i}" for i in range(threads)]
        store.ensure("s", "", keys)
        counts = [0] * threads
        stop = time.monotonic() + seconds

        def work(i: int) -> None:
            lease = store.try_acquire("s", "", keys[i], f"bench:{i}:-")
            assert lease is not None
            page = 0
            while time.monotonic() < stop:
                page += 1
                lease.log = [{
                    "stream": "s", "scope": "", "partition": keys[i], "page": page,
                    "records": 100, "cursor_before": str(page - 1), "cursor_after": str(page),
                    "flow_run_id": None, "task_run_id": None,
                }]  # fmt: skip
                store.commit(lease, patch={"page": page, "cursor": page})
            counts[i] = page

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        began = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        took = time.monotonic() - began
        store.engine.dispose()
    return sum(counts) / took


def events(pg: Postgres, pages: int, partitions: int) -> tuple[int, float, float]:
    """(task runs recorded, seconds of the run, seconds until the server recorded them)."""
    work = BENCH / ".scale" / f"events-{int(time.time())}"
    work.mkdir(parents=True)
    items = pages * 10
    with PostgresPrefect(pg) as server, DemoAPIProcess(items) as api, pg.schema() as schema:
        stream = partitioned_stream(10, partitions)
        config = write_config(
            work / "pagesync.yaml", base_url=api.url, streams={"items": stream},
            state=pg.sqlalchemy_url(schema), concurrency=partitions,
        )  # fmt: skip
        env = server.env(work / "client")

        def count() -> int:
            r = httpx.post(f"{server.url}/task_runs/count", json={}, timeout=30)
            return int(r.json())

        import subprocess

        began = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "pagesync.cli", "run", "items", "-c", str(config)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        ran = time.monotonic() - began
        last, steady = -1, time.monotonic()
        while time.monotonic() - steady < 5:
            n = count()
            if n != last:
                last, steady = n, time.monotonic()
            time.sleep(0.5)
        recorded = steady - began
    return last, ran, recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--only", default="commits,events")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    pg = Postgres(args.postgres)
    if "commits" in args.only:
        for n in (1, 4, 8, 16):
            print(f"commits: {n:2d} threads: {commits(pg, n, args.seconds):7.0f} commits/s",
                  flush=True)  # fmt: skip
    if "events" in args.only:
        n, ran, recorded = events(pg, args.pages, args.partitions)
        print(f"events: {n} task runs; run {ran:.1f} s; recorded by {recorded:.1f} s: "
              f"{n / recorded:.0f} task runs/s recorded")  # fmt: skip


if __name__ == "__main__":
    main()
