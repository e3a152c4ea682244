"""What the dashboard shows of a checkpoint, read back from the real Prefect server: each
page task run's state message, the partition task run's two log lines, readable artifact
keys and descriptions with links to the partition task runs; the CLI's links to the UI;
a config error found at run time exits 2. Runs go through the CLI, as a user's would, so
its logging settings (Prefect's task-run logger turned down to WARNING) apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, daily_stream, run_cli, write_config
from helpers import task_runs_of, wait_for

from pagesync.cli.links import ui_url
from pagesync.core.config import Checkpoint
from pagesync.core.engine import PageResult
from pagesync.demo.api import DemoAPI
from pagesync.tasks import messages

PER_PAGE = 150
BATCHED = {**STREAMS["cursor"], "checkpoint": {"every_pages": 3}}


def _client() -> Any:
    from prefect import get_client

    return get_client(sync_client=True)


def _task_runs(c: Any, flow_run_id: str, count: int) -> dict[str, Any]:
    """The flow run's task runs by name, once all `count` are final (they reach the API
    through events, a moment after the flow run ends)."""

    def final() -> dict[str, Any] | None:
        done = [t for t in task_runs_of(c, flow_run_id) if t.state and t.state.is_final()]
        return {t.name: t for t in done} if len(done) >= count else None

    return wait_for(final, 30, what=f"{count} final task runs of flow run {flow_run_id}")


def _story(c: Any, task_run_id: Any, lines: int) -> list[str]:
    """The partition task run's own log lines (pagesync's), once `lines` reached the API."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    log_filter = LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))

    def logged() -> list[str] | None:
        found = c.read_logs(log_filter=log_filter)
        mine = [lg.message for lg in found if lg.name == "prefect.task_runs.pagesync"]
        return mine if len(mine) >= lines else None

    return wait_for(logged, 30, what=f"{lines} pagesync lines in the partition's logs")


def _history(path: Path, stream: str, **env: str) -> list[dict[str, Any]]:
    done = run_cli("history", stream, "-c", str(path), "--json", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_page_task_runs_say_what_their_checkpoint_committed(tmp_path: Path, api: DemoAPI) -> None:
    """Every 3 pages a checkpoint: pages between say they are not committed yet, the
    committing page what its checkpoint covers; the page retried after its request failed
    says which attempt committed; the partition logs where it started and how it ended."""
    path = write_config(tmp_path, api.url, {"items": BATCHED})
    # Page 6's request fails all three HTTP tries: the page task retries, redoing 4 to 6.
    api.add_fault(kind="status", status=503, path="/cursor/items", after=5, times=3)
    run = run_cli("run", "items", "-c", str(path))
    assert run.returncode == 0, run.stderr
    hist = {h["page"]: h for h in _history(path, "items")}
    last = max(hist)
    assert last == -(-len(api.items) // PER_PAGE) == 14
    flow_run_id = hist[1]["flow_run_id"]

    with _client() as c:
        runs = _task_runs(c, flow_run_id, last + 1)
        message = {p: runs[f"items · all · page {p}"].state.message for p in hist}
        assert message[1] == (
            f"150 records read, not committed yet (checkpoint every 3 pages) · cursor "
            f"{hist[1]['cursor']} · page 1"
        )
        assert (
            message[3]
            == f"committed 450 records of pages 1-3 · cursor {hist[3]['cursor']} · page 3"
        )
        assert runs["items · all · page 6"].run_count == 2
        assert message[6] == (
            f"committed 450 records of pages 4-6 on attempt 2 of 2 · cursor {hist[6]['cursor']} "
            "· page 6"
        )
        tail = len(api.items) - 12 * PER_PAGE
        assert message[last] == (
            f"committed {tail} records of pages 13-{last} · cursor {hist[last]['cursor']} · "
            f"page {last} · partition complete"
        )
        partition = runs["items · all"]
        started, ended = _story(c, partition.id, 2)
        assert started == "items · all: fresh: from page 1"
        assert ended.startswith(
            "items · all: complete: 14 pages, 2,000 records committed in this run, "
            "0 rejected records, "
        ) and ended.endswith(" s (partition total: 14 pages, 2,000 records)")
        # Per-page lines stay out of the logs (a retried page's warning aside).
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = c.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
        per_page = [lg for lg in logs if lg.task_run_id not in (None, partition.id)]
        assert {lg.task_run_id for lg in per_page} <= {runs["items · all · page 6"].id}
        assert not [lg for lg in logs if lg.task_run_id and "Finished in state" in lg.message]


def test_a_failed_page_says_what_was_kept_and_the_next_run_resumes_there(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"items": BATCHED})
    api.add_fault(kind="status", status=400, path="/cursor/items", after=4, times=-1)
    failed = run_cli("run", "items", "-c", str(path))
    assert failed.returncode == 1, failed.stderr
    hist = _history(path, "items")
    assert [h["page"] for h in hist] == [1, 2, 3]
    first_run = hist[0]["flow_run_id"]
    with _client() as c:
        runs = _task_runs(c, first_run, 6)  # pages 1-5 and the partition
        page5 = runs["items · all · page 5"]
        assert page5.state.is_failed()
        assert page5.state.message.startswith(
            "nothing committed; partition resumes at page 4 (page 4 read since the last "
            "checkpoint rolled back too) · HTTPError: stream items, partition all, page 5: HTTP 400"
        ), page5.state.message
        _, ended = _story(c, runs["items · all"].id, 2)
        assert ended.startswith(
            "items · all: incomplete: 3 pages, 450 records committed in this run"
        ) and ended.endswith("; the next run resumes at page 4")

    api.clear_faults()
    again = run_cli("run", "items", "-c", str(path))
    assert again.returncode == 0, again.stderr
    hist = _history(path, "items")
    second_run = hist[-1]["flow_run_id"]
    assert second_run != first_run
    with _client() as c:
        runs = _task_runs(c, second_run, 12)  # pages 4-14 and the partition
        started, _ = _story(c, runs["items · all"].id, 2)
        assert started == (
            f"items · all: resumed from page 4, cursor {hist[2]['cursor']} "
            "(3 pages, 450 records committed before)"
        )

    # From the CLI to the UI: each page's task run, each partition's last flow run.
    ui = "http://ui.example:4200"
    table = run_cli("history", "items", "-c", str(path), PREFECT_UI_URL=ui + "/")
    assert table.returncode == 0, table.stderr
    for h in hist:
        assert f"{ui}/runs/task-run/{h['task_run_id']}" in table.stdout
    state = run_cli("state", "items", "-c", str(path), PREFECT_UI_URL=ui)
    assert f"{ui}/runs/flow-run/{second_run}" in state.stdout, state.stdout
    [row] = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    derived = ui_url()  # the tests' server: its PREFECT_API_URL without /api
    assert derived and not derived.endswith("/api")
    assert row["flow_run_url"] == f"{derived}/runs/flow-run/{second_run}"
    assert [h["task_run_url"] for h in _history(path, "items")] == [
        f"{derived}/runs/task-run/{h['task_run_id']}" for h in hist
    ]
    # No UI address anywhere: the ids, and no link.
    nowhere = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "no-prefect")}
    plain = run_cli("history", "items", "-c", str(path), **nowhere)
    assert "runs/task-run" not in plain.stdout and hist[0]["task_run_id"] in plain.stdout


def test_backfill_artifacts_have_short_keys_descriptions_and_links(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"daily": daily_stream(50)})
    run = run_cli(
        "backfill", "daily", "--start", "2024-01-03", "--end", "2024-01-05", "-c", str(path)
    )
    assert run.returncode == 0, run.stderr
    flow_run_id = _history(path, "daily")[0]["flow_run_id"]
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        by_key = {a.key: a for a in arts}
        assert set(by_key) == {
            "pagesync-daily-2024-01-03", "pagesync-daily-2024-01-04", "pagesync-daily-partitions",
        }  # fmt: skip
        scope = "(backfill 2024-01-03T00:00:00Z..2024-01-05T00:00:00Z)"
        assert by_key["pagesync-daily-2024-01-03"].description.startswith(
            f"Progress of partition **2024-01-03** of stream **daily** {scope}: complete, "
        )
        table = by_key["pagesync-daily-partitions"]
        assert table.description.startswith(
            f"Partitions of stream **daily** {scope} in this flow run"
        )
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        runs = _task_runs(c, flow_run_id, 1)
        ui = ui_url()
        for row in rows:
            partition = runs[f"daily · {row['partition']}"]
            link = f"{ui}/runs/task-run/{partition.id}"
            assert row["task run"] == f"[{partition.id}]({link})"


def test_a_class_that_cannot_be_imported_is_a_config_error(tmp_path: Path, api: DemoAPI) -> None:
    stream = {"class": "no_such_module_here:Items", "primary_key": ["id"]}
    path = write_config(tmp_path, api.url, {"items": stream})
    run = run_cli("run", "items", "-c", str(path))
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"{path}, at streams.items.class" in run.stderr
    assert "no_such_module_here" in run.stderr
    assert "run again to resume" not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


def test_page_messages_name_what_was_committed() -> None:
    policy = Checkpoint(every_pages=None, every_records=1000, every_seconds=30)
    pending = PageResult(
        page=2, records=1000, cursor="2024-01-03T04:05:06Z", committed=False, done=False
    )
    text = messages.page_message(
        pending, committed_pages=0, committed_records=0, attempt=1, attempts=3, policy=policy
    )
    assert text == (
        "1,000 records read, not committed yet (checkpoint every 1,000 records or every 30 s) "
        "· cursor 2024-01-03T04:05:06Z · page 2"
    )
    one = PageResult(page=17, records=1000, cursor="x" * 200, committed=True, done=False)
    text = messages.page_message(
        one, committed_pages=1, committed_records=1000, attempt=1, attempts=3, policy=Checkpoint()
    )
    assert text == f"committed 1,000 records · cursor {'x' * 79}… · page 17"
    no_cursor = PageResult(page=1, records=1, cursor=None, committed=True, done=True)
    text = messages.page_message(
        no_cursor,
        committed_pages=1,
        committed_records=1,
        attempt=1,
        attempts=1,
        policy=Checkpoint(),
    )
    assert text == "committed 1 record · page 1 · partition complete"
    assert messages.failed_message(17, 17, KeyboardInterrupt()) == (
        "nothing committed; partition resumes at page 17 · KeyboardInterrupt"
    )


@pytest.mark.parametrize(
    ("env", "profile", "expected"),
    [
        ({"PREFECT_UI_URL": "https://ui.example/"}, None, "https://ui.example"),
        ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, None, "http://127.0.0.1:4200"),
        (
            {"PREFECT_API_URL": "https://api.prefect.cloud/api/accounts/a1/workspaces/w1"},
            None,
            "https://app.prefect.cloud/account/a1/workspace/w1",
        ),
        ({}, 'active = "dev"\n[profiles.dev]\nPREFECT_API_URL = "http://h:9/api"\n', "http://h:9"),
        ({}, None, None),
    ],
)
def test_the_ui_address_is_derived_as_prefect_derives_it(
    tmp_path: Path, env: dict[str, str], profile: str | None, expected: str | None
) -> None:
    if profile:
        (tmp_path / "profiles.toml").write_text(profile)
    assert ui_url({"PREFECT_HOME": str(tmp_path), **env}) == expected


def test_the_ui_address_follows_prefect_profiles_path_and_profile(tmp_path: Path) -> None:
    """The same profile lookup as the local server's (`prefect.settings.profile`): a profiles
    file elsewhere and a profile chosen by PREFECT_PROFILE, never the default file's."""
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(
        'active = "a"\n[profiles.a]\nPREFECT_API_URL = "http://a:1/api"\n'
        '[profiles.b]\nPREFECT_API_URL = "http://b:2/api"\n'
    )
    (tmp_path / "profiles.toml").write_text('[profiles.a]\nPREFECT_API_URL = "http://no:3/api"\n')
    env = {"PREFECT_HOME": str(tmp_path), "PREFECT_PROFILES_PATH": str(elsewhere)}
    assert ui_url(env) == "http://a:1"
    assert ui_url({**env, "PREFECT_PROFILE": "b"}) == "http://b:2"
    elsewhere.write_text("not toml [")
    assert ui_url(env) is None  # broken profiles: no link, never a crash
