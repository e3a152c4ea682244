"""The Prefect UI, driven in headless Chromium: a backfill started from its deployment's run
form, its per-page task runs and artifacts found on the flow run page, and a failed backfill
retried with the flow run page's Retry button, fetching only what was not committed.

Against the session's real Prefect server (which serves the UI) and `pagesync up` serving
the deployments, as a user would run them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    committed_pages,
    partition_rows,
    task_runs_of,
    wait_for,
)
from test_deploy import (
    DAILY,
    NEVER,
    Up,
    assert_stopped_at_page_boundaries,
    client,
    in_range,
    wait_final,
)

from pagesync.demo.api import DemoAPI

pytestmark = pytest.mark.ui

CHROMIUM = os.environ.get("PAGESYNC_CHROMIUM", "/usr/bin/chromium")
OUTPUT = Path(os.environ.get("PAGESYNC_TEST_OUTPUT", Path(__file__).parent.parent / "test-output"))
#: The kebab (three dots) icon of the UI's menus.
KEBAB = "button:has(svg path[d^='M12 6.75'])"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page; on failure a screenshot of where it was is kept too."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    yield page
    folder = output_folder(request.node.name)
    page.screenshot(path=str(folder / "last-page.png"), full_page=True)
    page.close()


def output_folder(test: str) -> Path:
    folder = OUTPUT / re.sub(r"[^\w.-]+", "_", test)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def ui(prefect_api_url: str) -> str:
    return prefect_api_url.removesuffix("/api")


@pytest.fixture
def served(tmp_path: Path, api: DemoAPI, prefect_api_url: str) -> Iterator[tuple[str, Path]]:
    """A daily-windowed stream of its own, its deployments served by `pagesync up`."""
    stream = f"ui_{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path, api.url, {stream: {**DAILY, "schedule": NEVER}})
    with Up("-c", str(path), env={"PREFECT_API_URL": prefect_api_url}, cwd=tmp_path) as up:
        up.wait_for("Ctrl-C stops the runner.")
        yield stream, path
        assert up.stop(signal.SIGTERM) == 0, up.output


def open_flow_run(page: Any, ui: str, flow_run_id: Any) -> None:
    page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Task Runs", exact=True).wait_for()


def history(path: Path, stream: str) -> list[dict[str, Any]]:
    done = run_cli("history", stream, "-c", str(path), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_backfill_from_the_run_form_shows_page_task_runs_and_artifacts(
    page: Any, ui: str, served: tuple[str, Path], api: DemoAPI, tmp_path: Path
) -> None:
    stream, path = served
    with client() as c:
        deployment = c.read_deployment_by_name(f"{stream}/backfill")

    # The run form: start and end, typed and described (from the flow's docstring).
    page.goto(f"{ui}/deployments/deployment/{deployment.id}/run")
    page.get_by_text("Parameters", exact=True).wait_for()
    labels = page.locator(".schema-form-property__label").all_inner_texts()
    assert [label.split()[0] for label in labels] == ["start", "end", "backfill_id"], labels
    assert page.get_by_text("first instant to sync (inclusive)", exact=False).is_visible()
    assert page.get_by_text("Select date and time").count() == 2  # date-time pickers

    # Fill start and end in the form's JSON input (the pickers are mouse-only widgets).
    page.locator(KEBAB).first.click()
    page.get_by_text("Use JSON input").first.click()
    editor = page.locator(".p-code-input textarea")
    shown = json.loads(editor.input_value())
    assert shown == {"stream": stream, "config": str(path.resolve())}  # the fixed parameters
    start, end = "2024-01-03T00:00:00Z", "2024-01-06T00:00:00Z"
    editor.fill(json.dumps({**shown, "start": start, "end": end}))
    # Submitted: the UI leaves the form for the deployment's page.
    left = re.compile(rf"/deployments/deployment/{deployment.id}(\?.*)?$")
    through_busy_server(
        page, page.get_by_role("button", name="Submit").click, _reached(page, left),
        what="the run form's submission",
    )  # fmt: skip

    with client() as c:
        [run] = wait_for(lambda: _runs_of(c, deployment.id), 60, what="the form's flow run")
    done = wait_final(run.id)
    assert done.state.is_completed(), done.state
    assert done.parameters["start"] and done.parameters["end"]
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    assert_exactly_once(db, stream, in_range(api, "2024-01-03", "2024-01-06"))
    assert_counters_match_log(db, stream)

    # The flow run page: every page a task run named stream · window · page n, and as many
    # task runs as the history has pages plus one per window (the partition tasks).
    pages = [h for h in history(path, stream) if h["flow_run_id"] == str(run.id)]
    windows = sorted({h["partition"] for h in pages})
    assert windows == ["2024-01-03", "2024-01-04", "2024-01-05"]
    wanted = {h["task_run_id"] for h in pages}
    with client() as c:  # each page's task run is the one the history names, under its partition
        # (task runs reach the API through events: the last ones may come a moment later)
        by_id = wait_for(
            lambda: (ts := {str(t.id): t for t in task_runs_of(c, run.id)}) and wanted <= set(ts)
            and ts, 30, what="every page's task run in the API",
        )  # fmt: skip
    for h in pages:
        task = by_id[h["task_run_id"]]
        assert task.name == f"{stream} · {h['partition']} · page {h['page']}"
        [parent] = [by_id[str(i.id)] for i in task.task_inputs["__parents__"]]
        assert parent.name == f"{stream} · {h['partition']}" and f"stream:{stream}" in parent.tags
    open_flow_run(page, ui, run.id)
    page.get_by_text(f"{len(pages) + len(windows)} Task runs").first.wait_for()
    page.get_by_text("Task Runs", exact=True).click()
    for h in pages:
        if h["page"] == 1:
            name = f"{stream} · {h['partition']} · page 1"
            page.get_by_text(name, exact=True).wait_for()
    page.screenshot(path=str(output_folder("flow-run") / "task-runs.png"), full_page=True)

    # Artifacts: the run's table of partitions and one progress artifact per window.
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text(f"pagesync-{stream.replace('_', '-')}-partitions").wait_for()
    assert page.get_by_text("PROGRESS", exact=False).count() >= len(windows)
    page.screenshot(path=str(output_folder("flow-run") / "flow-run.png"), full_page=True)


def through_busy_server(
    page: Any, act: Callable[[], None], done: Callable[[float], bool], what: str, tries: int = 3
) -> None:
    """`act()` in the UI (a click that makes the UI call the API), then `done(ms)`: a
    Playwright wait of up to `ms` for its effect, True once it happened.

    Under the suite's load the test server's SQLite is at times busy, and Prefect answers
    503, an error its own client retries (`is_client_retryable_exception`) but the UI shows
    as "Oops. Something went wrong." (seen: 2 CI runs in 9 on the run form's Submit); a
    user clicks again, and so does this. Any other outcome (no answer, a 4xx) fails,
    naming what the API said."""
    refused: list[str] = []

    def watch(response: Any) -> None:
        if response.status >= 400 and "/api/" in response.url:
            refused.append(f"{response.status} {response.request.method} {response.url}")

    page.on("response", watch)
    try:
        for _ in range(tries):
            seen = len(refused)
            act()
            if done(30_000):
                return
            new = refused[seen:]
            assert new and all(r.startswith("5") for r in new), (
                f"{what}: did not happen; the API answered: {new or 'nothing'}"
            )
        raise AssertionError(f"{what}: the API refused it {tries} times: {refused}")
    finally:
        page.remove_listener("response", watch)


def _reached(page: Any, url: re.Pattern[str]) -> Callable[[float], bool]:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    def done(ms: float) -> bool:
        try:
            page.wait_for_url(url, timeout=ms)
            return True
        except PlaywrightTimeout:
            return False

    return done


def _until(page: Any, condition: Callable[[], bool]) -> Callable[[float], bool]:
    """`condition` (read from the API) polled while the page handles its events."""

    def done(ms: float) -> bool:
        deadline = time.monotonic() + ms / 1000
        while not condition():
            if time.monotonic() > deadline:
                return False
            page.wait_for_timeout(50)  # the poll's interval; the page's events go on
        return True

    return done


def _runs_of(c: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return c.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )


def test_failed_backfill_retried_from_the_ui_fetches_only_what_was_not_committed(
    page: Any, ui: str, served: tuple[str, Path], api: DemoAPI, tmp_path: Path
) -> None:
    stream, path = served
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    start, end = "2024-01-01T00:00:00Z", "2024-01-11T00:00:00Z"
    # The API starts failing midway (a 400 is not retried): some windows complete, some
    # stop after a few committed pages, some never start.
    api.add_fault(kind="status", status=400, path="/next/items", after=15, times=-1)
    with client() as c:
        deployment = c.read_deployment_by_name(f"{stream}/backfill")
        run = c.create_flow_run_from_deployment(
            deployment.id, parameters={"start": start, "end": end}
        )
    failed = wait_final(run.id)
    assert failed.state.is_failed(), failed.state
    before = {p["partition"]: p for p in partition_rows(db, stream)}
    complete = {k for k, p in before.items() if p["status"] == "complete"}
    resumed = {k: json.loads(p["state"]).get("cursor") for k, p in before.items()
               if p["status"] != "complete" and p["pages"] > 0}  # fmt: skip
    assert complete, "no window completed before the fault: the test proves nothing"
    assert resumed, "no window stopped midway: the test proves nothing"

    api.clear_faults()
    api.clear_requests()
    open_flow_run(page, ui, run.id)

    def retry() -> None:
        modal = page.locator(".p-modal")
        if not modal.is_visible():  # after a refused retry, the dialog may still be open
            page.get_by_role("button", name=re.compile("Retry")).first.click()
        modal.get_by_role("button", name="Retry").click()  # "Retry ...?"

    with client() as c:
        through_busy_server(
            page, retry,
            _until(page, lambda: (r := c.read_flow_run(run.id)).run_count > 1
                   or not r.state.is_failed()),
            what="the UI's retry of the failed flow run",
        )  # fmt: skip
        retried = wait_for(
            lambda: (r := c.read_flow_run(run.id)).run_count > 1 and r.state.is_final() and r,
            180, what="the retried flow run to finish",
        )  # fmt: skip
    assert retried.state.is_completed(), retried.state
    assert retried.id == run.id  # the same flow run, retried: not a new one
    page.reload()
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=str(output_folder("retry") / "flow-run.png"), full_page=True)

    assert_exactly_once(db, stream, in_range(api, start[:10], end[:10]))
    assert_counters_match_log(db, stream)
    # Only what was not committed was fetched: complete windows not at all, windows that
    # stopped midway from their committed cursor on (inclusive: equal values may straddle).
    fetched: dict[str, list[str]] = {}
    for r in api.requests:
        window = r["query"]["updated_at__lt"][:10]
        day = _day_before(window)
        fetched.setdefault(day, []).append(r["query"]["updated_at__gte"])
    assert not complete & set(fetched), f"complete windows fetched again: {complete & set(fetched)}"
    for window, cursor in resumed.items():
        assert min(fetched[window]) == cursor, (window, cursor, fetched[window][:2])


def test_a_backfill_cancelled_from_the_ui_keeps_its_pages_and_a_rerun_resumes(
    page: Any, ui: str, served: tuple[str, Path], api: DemoAPI, tmp_path: Path
) -> None:
    """Cancel on a running backfill's flow run page (its confirmation, too): `pagesync up`'s
    runner stops the run's process, whose partitions end after their pages in progress; the
    flow run ends Cancelled, no task run is left Running, the pages it committed stay, and
    the same backfill run again fetches each window from its next page on: every record
    once."""
    stream, path = served
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    start, end = "2024-01-10T00:00:00Z", "2024-01-15T00:00:00Z"
    api.add_fault(kind="slow", delay=5.0, times=-1, after=6)  # slow once it has begun
    with client() as c:
        deployment = c.read_deployment_by_name(f"{stream}/backfill")
        run = c.create_flow_run_from_deployment(
            deployment.id, parameters={"start": start, "end": end}
        )
    wait_for(lambda: committed_pages(db, stream) >= 2, 180, what="2 committed pages")
    open_flow_run(page, ui, run.id)

    def cancel() -> None:
        modal = page.locator(".p-modal")
        if not modal.is_visible():  # after a refused cancel, the dialog may still be open
            page.get_by_role("button", name="Cancel", exact=True).first.click()
        modal.get_by_role("button", name="Confirm").click()

    with client() as c:
        through_busy_server(
            page, cancel, _until(page, lambda: not c.read_flow_run(run.id).state.is_running()),
            what="the UI's cancel of the running flow run",
        )  # fmt: skip
    cancelled = wait_final(run.id)
    assert cancelled.state.is_cancelled(), cancelled.state
    page.reload()
    page.get_by_text("Cancelled").first.wait_for()
    page.screenshot(path=str(output_folder("cancel") / "flow-run.png"), full_page=True)
    kept = history(path, stream)
    assert kept and all(p["flow_run_id"] == str(run.id) for p in kept)
    assert_stopped_at_page_boundaries(run.id)

    api.clear_faults()
    again = run_cli("backfill", stream, "--start", start, "--end", end, "-c", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert_exactly_once(db, stream, in_range(api, start[:10], end[:10]))
    assert_counters_match_log(db, stream)
    # Each window's pages: those of the cancelled run first, then the rerun's from the next
    # page on; nothing committed was fetched and committed again.
    windows: dict[str, list[tuple[int, bool]]] = {}
    for p in history(path, stream):
        windows.setdefault(p["partition"], []).append((p["page"], p["flow_run_id"] == str(run.id)))
    for window, pages in windows.items():
        numbers = sorted(n for n, _ in pages)
        assert numbers == list(range(1, len(pages) + 1)), (window, pages)
        ours = sorted(n for n, by_cancelled in pages if by_cancelled)
        assert ours == numbers[: len(ours)], (window, pages)


def _day_before(day: str) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) - timedelta(days=1)).isoformat()


def test_a_resumed_backfill_shows_each_pages_checkpoint_and_the_partitions_story(
    page: Any, ui: str, api: DemoAPI, tmp_path: Path
) -> None:
    """A backfill stopped by the API midway, run again from the CLI: in the UI, the
    resumed window's partition task run logs where it resumed from, a page task run's
    state (on its Completed event's page: Prefect's task run page shows no state message)
    says what it committed and at which cursor, and the artifacts have readable titles."""
    from conftest import daily_stream

    from pagesync.cli.links import ui_url

    stream = f"ui_{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path, api.url, {stream: daily_stream(20)})
    window = ("--start", "2024-01-03", "--end", "2024-01-05", "-c", str(path))
    api.add_fault(kind="status", status=400, path="/next/items", after=5, times=-1)
    assert run_cli("backfill", stream, *window).returncode == 1
    api.clear_faults()
    done = run_cli("backfill", stream, *window)
    assert done.returncode == 0, done.stderr
    pages = history(path, stream)
    run_id = pages[-1]["flow_run_id"]
    resumed = [h for h in pages if h["flow_run_id"] == run_id]
    first_runs = {h["partition"] for h in pages if h["flow_run_id"] != run_id}
    # A window the fault stopped midway: it has pages from both runs (the other window may
    # have completed before the fault, and is then skipped by the second run).
    midway = first_runs & {h["partition"] for h in resumed}
    assert midway, "no window was stopped midway by the fault: the test proves nothing"
    window_key = sorted(midway)[0]
    before = [h for h in pages if h["partition"] == window_key and h["flow_run_id"] != run_id]
    page_1 = next(h for h in resumed if h["partition"] == window_key)
    with client() as c:
        by_name = wait_for(
            lambda: (ts := {t.name: t for t in task_runs_of(c, run_id)})
            and all(t.state.is_final() for t in ts.values()) and len(ts) >= len(resumed) + 2
            and ts, 30, what="the run's task runs in the API",
        )  # fmt: skip
    partition = by_name[f"{stream} · {window_key}"]
    one = by_name[f"{stream} · {window_key} · page {page_1['page']}"]
    folder = output_folder("checkpoints")

    # The partition task run's logs: where it resumed from.
    page.goto(ui_url() + f"/runs/task-run/{partition.id}")
    resume_line = (
        f"{stream} · {window_key}: resumed from page {before[-1]['page'] + 1}, "
        f"cursor {before[-1]['cursor']}"
    )
    page.get_by_text(resume_line, exact=False).first.wait_for()
    page.get_by_text(f"{stream} · {window_key}: complete:", exact=False).first.wait_for()
    page.screenshot(path=str(folder / "partition-logs.png"), full_page=True)

    # The page task run, then its Completed event: the checkpoint it committed.
    page.goto(ui_url() + f"/runs/task-run/{one.id}")
    page.get_by_text(one.name, exact=True).first.wait_for()
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=str(folder / "page-task-run.png"), full_page=True)
    day = one.state.timestamp.strftime("%Y-%m-%d")
    page.goto(f"{ui}/v2/events/event/{day}/{one.state.id}")
    page.get_by_text(one.name, exact=True).first.wait_for()
    page.get_by_text("Raw", exact=True).first.click()
    shown = f"committed {page_1['records']} record"
    page.get_by_text(shown, exact=False).first.wait_for()
    text = page.inner_text("body")
    assert f"cursor {page_1['cursor']} · page {page_1['page']}" in text, text[-2000:]
    page.screenshot(path=str(folder / "page-checkpoint.png"), full_page=True)

    # The flow run's artifacts: titles of stream and window, descriptions that say what.
    open_flow_run(page, ui, run_id)
    page.get_by_text("Artifacts", exact=True).click()
    slug = stream.replace("_", "-")
    for key in (f"pagesync-{slug}-partitions", f"pagesync-{slug}-2024-01-03",
                f"pagesync-{slug}-2024-01-04"):  # fmt: skip
        page.get_by_text(key, exact=True).first.wait_for()
    page.get_by_text(
        f"Progress of partition 2024-01-03 of stream {stream}", exact=False
    ).first.wait_for()
    page.screenshot(path=str(folder / "artifacts.png"), full_page=True)
    # The partitions table links each window to its partition task run.
    page.get_by_text(f"pagesync-{slug}-partitions", exact=True).first.click()
    link = page.locator(f"a[href$='/runs/task-run/{partition.id}']")
    link.first.wait_for()
    page.screenshot(path=str(folder / "partitions-table.png"), full_page=True)
