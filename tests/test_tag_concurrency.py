"""A stream's partitions under a Prefect tag concurrency limit: `concurrency:` bounds the
partitions of one run; a limit on the stream's tag bounds them on the whole Prefect server,
across runs and across the child flow runs of `fan_out: deployment`. A real `pagesync run`
on the session's Prefect server, against the demo API."""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from conftest import daily_stream, run_cli, write_config

from pagesync.demo.api import DemoAPI


def _client() -> Any:
    from prefect import get_client

    return get_client(sync_client=True)


def test_a_tag_concurrency_limit_runs_a_streams_partitions_one_at_a_time(
    tmp_path: Path, api: DemoAPI
) -> None:
    stream = f"limited_{uuid.uuid4().hex[:8]}"  # a tag of its own on the shared server
    spec = daily_stream(12)  # 6 pages a day
    spec["partitions"] = {**spec["partitions"], "end": "2024-01-04T00:00:00Z"}  # 3 days
    path = write_config(tmp_path, api.url, {stream: spec}, source={"concurrency": 3})
    tag = f"stream:{stream}"
    # A partition's pages take longer (3.6 s) than Prefect spaces the starts of task runs
    # that wait on a tag's limit (up to about 2 s, measured), so a limit of more than one
    # would let them overlap here.
    api.add_fault(kind="slow", delay=0.6, times=-1)
    with _client() as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=1)
        try:
            result = run_cli("run", stream, "-c", str(path))
        finally:
            client.delete_concurrency_limit_by_tag(tag=tag)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 partitions complete" in result.stdout

    # Each partition's requests (its window's end is in every one) span an interval; one
    # slot means the intervals follow each other. The source's `concurrency: 3` alone
    # would start all three at once.
    at: dict[str, list[float]] = defaultdict(list)
    for r in api.requests:
        at[r["query"]["updated_at__lt"]].append(r["at"])
    spans = sorted((min(v), max(v)) for v in at.values())
    assert len(spans) == 3 and all(len(v) >= 2 for v in at.values()), at
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end < start, f"partitions overlapped under a limit of 1: {spans}"
