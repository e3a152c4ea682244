"""State you can trust: a partition whose runner was killed does not show as plainly
`running` in `pagesync state`, its `--json` and the next flow run's partitions table."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from conftest import STREAMS, run_cli, write_config
from helpers import partition_rows

from pagesync.demo.api import DemoAPI


def _partitions_table(flow_run_id: str) -> list[dict[str, Any]]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    [table] = [a for a in arts if a.key == "pagesync-items-partitions"]
    return json.loads(table.data) if isinstance(table.data, str) else table.data


def test_a_killed_runners_partition_shows_its_holder_dead_until_taken_over(
    tmp_path: Path, api: DemoAPI
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]}, state=db)
    killed = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="after_commit:3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    [row] = partition_rows(db, "items")
    assert row["status"] == "running" and row["lease_owner"]  # as the killed runner left it

    table = run_cli("state", "items", "-c", str(path), COLUMNS="250")
    assert table.returncode == 0, table.stderr
    assert "running, holder dead since" in table.stdout, table.stdout
    [view] = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    assert view["status"] == "running"
    assert view["holder"] == row["lease_owner"] and view["holder_dead_since"], view

    done = run_cli("run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    [view] = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    assert view["status"] == "complete" and view["holder_dead_since"] is None, view
    flow_run_id = view["flow_run_id"]
    [part] = _partitions_table(flow_run_id)
    assert part["taken over"].startswith("holder dead since "), part
    assert part["resumed from"].startswith("cursor "), part


def test_a_live_runners_partition_is_plainly_running(tmp_path: Path) -> None:
    """The same state held by a process that lives (this one): no dead holder."""
    from pagesync.core.store import RUNNING, Store, owner_id
    from pagesync.core.views import partition_views

    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    store.migrate()
    store.ensure("items", "", ["all"])
    lease = store.acquire("items", "", "all", owner_id())
    store.commit(lease, patch={}, status=RUNNING)
    [view] = partition_views(store, "items")
    assert view.status == "running" and view.holder == owner_id()
    assert view.holder_dead_since is None and view.shown_status == "running"


def test_a_holder_on_another_host_is_dead_once_its_lease_expired() -> None:
    from datetime import UTC, datetime

    from pagesync.core.views import holder_dead_since

    row = {"status": "running", "lease_owner": "elsewhere:123:-", "lease_expires": 1000.0,
           "updated_at": datetime(2026, 1, 1)}  # fmt: skip
    assert holder_dead_since(row, now=999.0) is None  # within its lease: may be alive
    assert holder_dead_since(row, now=1001.0) == datetime.fromtimestamp(1000.0, UTC)
    assert holder_dead_since({**row, "status": "complete"}, now=1001.0) is None
