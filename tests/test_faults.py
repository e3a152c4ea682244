"""Every fault a source can throw, end to end through a real sync (demo API on loopback, real
Prefect server, SQLite): each ends in a bounded retry with every record exactly once, or in a
clear error naming stream, partition, page and URL, and never in a committed bad page.

`FAULTS` is the table the README quotes (fault -> what pagesync does); running this file as
a script prints it as Markdown, and the test session prints it at the end of the module.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import STREAMS, write_config
from helpers import (
    assert_counters_match_log,
    assert_exactly_once,
    committed_pages,
    partition_rows,
    rows,
)
from sqlalchemy import create_engine, text

from pagesync.cli.launch import flatten
from pagesync.demo.api import DemoAPI
from pagesync.prefect.local_server import free_port

PAGE = 200  # 2000 items: 10 pages
PATH = "/db/items.json"
SPEC = {**STREAMS["next_url"], "params": {"_size": PAGE}}
FAULT_PAGE = 4  # faults hit the 4th request: pages 1-3 are committed before it


# -- a tiny loopback JSON server, for what the demo API cannot serve -----------------------


class JSONServer:
    """A stdlib HTTP server on loopback answering every GET with `respond(path, query)`.

    `respond` returns (status, headers, body bytes). Shared with test_security.
    """

    def __init__(
        self, respond: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qsl, urlsplit

                target = urlsplit(self.path)
                query = dict(parse_qsl(target.query, keep_blank_values=True))
                outer.requests.append(
                    {"path": target.path, "query": query, "headers": dict(self.headers)}
                )
                status, headers, body = respond(target.path, query)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JSONServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One row of the README's table, and how the test injects it."""

    id: str
    fault: str
    does: str
    #: Demo API fault rules (path and `after` are filled in).
    rules: list[dict[str, Any]] = field(default_factory=list)
    #: "retried": the sync completes, every record once; "error": it fails at FAULT_PAGE.
    outcome: str = "retried"
    #: Words the error must contain (besides stream, partition, page and URL).
    says: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)


def _http_date(seconds: float) -> str:
    return formatdate(time.time() + seconds, usegmt=True)


FAULTS: list[Fault] = [
    Fault("429-retry-after-seconds", "429 with `Retry-After: 1`",
          "waits as told (capped by `retry.max_backoff`), retries the request; every record once",
          [{"kind": "status", "status": 429, "retry_after": "1"}]),
    Fault("429-retry-after-date", "429 with `Retry-After` as an HTTP date",
          "waits until that date (capped by `retry.max_backoff`), retries; every record once",
          [{"kind": "status", "status": 429, "retry_after": "@date"}]),
    *[
        Fault(f"{s}-twice", f"{s} twice, then OK",
              "retried in the request with exponential backoff and jitter; every record once",
              [{"kind": "status", "status": s, "times": 2}])
        for s in (500, 502, 503, 504)
    ],
    Fault("503-then-task-retry", "503 four times (more than `retry.attempts`)",
          "request retries spent, the page task is retried by Prefect (`task_retries`); every record once",
          [{"kind": "status", "status": 503, "times": 4}]),
    Fault("503-forever", "503 on every try",
          "bounded: `attempts` x (`task_retries` + 1) tries, then an error naming stream, "
          "partition, page, URL and last committed cursor; pages before it kept",
          [{"kind": "status", "status": 503, "times": -1}], "error", ("HTTP 503 after 3 tries",)),
    Fault("401", "401 Unauthorized", "not retried: an error naming the page and URL",
          [{"kind": "status", "status": 401, "times": -1}], "error", ("HTTP 401",)),
    Fault("reset-twice", "connection reset (RST) twice", "retried; every record once",
          [{"kind": "reset", "times": 2}]),
    Fault("reset-forever", "connection reset on every try", "bounded retries, then an error",
          [{"kind": "reset", "times": -1}], "error", ("after 3 tries",)),
    Fault("read-timeout", "read timeout (the response hangs past `timeout`)",
          "retried; every record once",
          [{"kind": "slow", "delay": 6}], source={"timeout": 2}),
    Fault("truncated-body", "truncated body (connection closed mid-body)",
          "retried as a network error; every record once",
          [{"kind": "truncate", "times": 2}]),
    Fault("truncated-forever", "truncated body on every try", "bounded retries, then an error",
          [{"kind": "truncate", "times": -1}], "error", ("after 3 tries",)),
    Fault("malformed-json", "malformed JSON, once",
          "the page task is retried (the body may be a transient glitch); every record once",
          [{"kind": "malformed"}]),
    Fault("malformed-forever", "malformed JSON on every try",
          "bounded retries, then an error saying malformed JSON; nothing of the page committed",
          [{"kind": "malformed", "times": -1}], "error", ("malformed JSON",)),
    Fault("html", "HTML instead of JSON (a proxy's error page)",
          "bounded retries, then an error saying HTML and the content-type",
          [{"kind": "html", "times": -1}], "error", ("HTML", "text/html")),
    Fault("empty-body", "empty body", "bounded retries, then an error saying the body is empty",
          [{"kind": "empty", "times": -1}], "error", ("empty response body",)),
    Fault("records-path-missing", "the records path is missing from the body",
          "not retried (the config or the API changed): an error naming the path",
          [{"kind": "missing_records"}], "error", ("'rows' not found",)),
    Fault("pagination-loop", "a page repeats the previous page's next token",
          "detected before the page is written: an error saying pagination loop; not retried",
          [{"kind": "repeat_token"}], "error", ("pagination loop",)),
    Fault("redirect-loop", "a redirect loop", "not retried: an error saying redirect loop",
          [{"kind": "redirect_loop", "times": -1}], "error", ("redirect loop",)),
]  # fmt: skip

#: Faults tested on their own below (no demo API rule injects them).
OTHER_FAULTS: list[tuple[str, str]] = [
    ("connection refused (nothing listens)", "bounded retries, then an error naming stream, "
     "partition, page and URL"),
    ("connect timeout (the server never accepts)", "bounded retries, then an error saying ConnectTimeout"),
    ("a very large page (5,000 records of ~2 KB)", "committed in one transaction; memory "
     "stays within a small multiple of the body"),
]  # fmt: skip


def fault_table() -> str:
    lines = ["| fault | what pagesync does |", "| --- | --- |"]
    lines += [f"| {f.fault} | {f.does} |" for f in FAULTS]
    lines += [f"| {fault} | {does} |" for fault, does in OTHER_FAULTS]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _print_table(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"fault kinds handled: {len(FAULTS) + len(OTHER_FAULTS)}")
        reporter.write_line(fault_table())


# -- helpers ----------------------------------------------------------------------------------


def sync_state(path: Path, stream: str = "items") -> Any:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), return_state=True)


def errors_of(state: Any) -> list[str]:
    exc = state.result(raise_on_failure=False)
    return [str(e) for e in flatten(exc)] if isinstance(exc, BaseException) else [str(exc)]


def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pagesync.db'}"


def assert_no_bad_page(url: str, api_items: list[dict[str, Any]], table: str = "items") -> None:
    """Every stored row is a real record, byte for byte where it counts, and the page log
    numbers its pages 1..n with no gap: nothing from a bad response was committed."""
    by_id = {i["id"]: i for i in api_items}
    for row in rows(url, table):
        item = by_id[row["id"]]
        assert (row["name"], row["updated_at"], row["price"]) == (
            item["name"], item["updated_at"], item["price"],
        ), row  # fmt: skip
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            pages = conn.execute(text("SELECT page FROM pagesync_pages ORDER BY id")).scalars()
            pages = list(pages)
    finally:
        engine.dispose()
    assert pages == list(range(1, len(pages) + 1)), pages
    assert_counters_match_log(url, table)


def injected(api: DemoAPI, fault: Fault) -> None:
    rules = []
    for rule in fault.rules:
        rule = {**rule, "path": PATH, "after": FAULT_PAGE - 1}
        if rule.get("retry_after") == "@date":
            rule["retry_after"] = _http_date(1.5)
        rules.append(rule)
    api.add_faults(rules)


def assert_clear_error(message: str, page: int, url: str, says: tuple[str, ...]) -> None:
    assert "stream items" in message, message
    assert "partition all" in message, message
    assert f"page {page}" in message, message
    assert url in message, f"the error must name the URL ({url}): {message}"
    assert "last committed cursor" in message, message
    for words in says:
        assert words in message, message


# -- every demo API fault -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault_is_retried_or_named_and_never_committed(
    tmp_path: Path, api: DemoAPI, fault: Fault
) -> None:
    path = write_config(tmp_path, api.url, {"items": SPEC}, source=fault.source or None)
    injected(api, fault)
    state = sync_state(path)
    served = [r["fault"] for r in api.requests]
    assert fault.rules[0]["kind"] in served, f"the fault was never served: {api.faults}"
    url = db(tmp_path)
    assert_no_bad_page(url, api.items)
    ids = [i["id"] for i in api.items]
    if fault.outcome == "retried":
        assert state.is_completed(), errors_of(state)
        assert_exactly_once(url, "items", ids)
        [part] = partition_rows(url, "items")
        assert part["status"] == "complete" and part["error"] is None
        return

    assert state.is_failed()
    [message] = errors_of(state)
    assert_clear_error(message, FAULT_PAGE, f"{api.url}{PATH}", fault.says)
    [part] = partition_rows(url, "items")
    assert part["status"] == "incomplete" and part["lease_owner"] is None
    assert part["error"] == message
    # The pages before the fault are committed and kept; nothing of the bad one.
    assert committed_pages(url, "items") == FAULT_PAGE - 1
    # The source recovers: the next run resumes from the kept cursor, every record once.
    cursor = orjson.loads(part["state"])["cursor"]
    api.clear_faults()
    api.clear_requests()
    assert sync_state(path).is_completed()
    assert_exactly_once(url, "items", ids)
    assert_no_bad_page(url, api.items)
    left = sum(i["updated_at"] >= cursor for i in api.items)  # the boundary value is re-read
    assert len(api.requests) == -(-left // PAGE)


def test_bounded_retries_count(tmp_path: Path, api: DemoAPI) -> None:
    """A persistent 503 costs exactly attempts x (task_retries + 1) requests, no more."""
    path = write_config(tmp_path, api.url, {"items": SPEC})
    api.add_fault(kind="status", status=503, times=-1, path=PATH, after=0)
    assert sync_state(path).is_failed()
    assert [r["fault"] for r in api.requests] == ["status"] * 3 * 2
    assert committed_pages(db(tmp_path), "items") == 0


# -- faults the demo API cannot inject ---------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_names_the_url(tmp_path: Path) -> None:
    port = _closed_port()  # bound and closed: nothing listens there
    base = f"http://127.0.0.1:{port}"
    path = write_config(tmp_path, base, {"items": SPEC})
    state = sync_state(path)
    assert state.is_failed()
    [message] = errors_of(state)
    assert_clear_error(message, 1, f"{base}{PATH}", ("ConnectError", "after 3 tries"))
    [part] = partition_rows(db(tmp_path), "items")
    assert part["status"] == "incomplete" and part["pages"] == 0


@pytest.fixture
def never_accepts() -> Iterator[str]:
    """A listening socket whose accept queue is full: new connections time out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # in progress: it never completes
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    yield f"http://127.0.0.1:{port}"
    for c in fillers:
        c.close()
    server.close()


def test_connect_timeout_is_bounded_and_named(tmp_path: Path, never_accepts: str) -> None:
    path = write_config(tmp_path, never_accepts, {"items": SPEC}, source={"timeout": 0.5})
    state = sync_state(path)
    assert state.is_failed()
    [message] = errors_of(state)
    assert_clear_error(message, 1, f"{never_accepts}{PATH}", ("ConnectTimeout",))
    assert committed_pages(db(tmp_path), "items") == 0


BIG_RECORDS = 5000
BIG_FIELD = 2000


def _big_page(path: str, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    if path == "/small":  # the warm-up run's page
        return 200, {}, orjson.dumps({"data": [{"id": 1}]})
    records = [
        {"id": i, "blob": f"{i:06d}" + "x" * BIG_FIELD, "nested": {"k": [i, str(i) * 20]},
         "updated_at": f"2024-01-01T00:00:{i % 60:02d}Z"}
        for i in range(1, BIG_RECORDS + 1)
    ]  # fmt: skip
    return 200, {}, orjson.dumps({"data": records})


def test_very_large_page_commits_with_bounded_memory(tmp_path: Path) -> None:
    spec = {"path": "/big", "records": "data", "primary_key": ["id"],
            "paginator": {"type": "single"}}  # fmt: skip
    with JSONServer(_big_page) as server:
        body = len(_big_page("/big", {})[2])
        warm = {**spec, "path": "/small"}
        path = write_config(tmp_path, server.url, {"big": spec, "warm": warm})
        # A first run imports Prefect's modules and starts its server: not the page's memory.
        assert sync_state(path, "warm").is_completed()
        tracemalloc.start()
        try:
            state = sync_state(path, "big")
            gc.collect()  # what a cycle still holds is garbage, not retained
            retained, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert state.is_completed(), errors_of(state)
    url = db(tmp_path)
    stored = rows(url, "big")
    assert len(stored) == BIG_RECORDS
    assert all(len(r["blob"]) == BIG_FIELD + 6 for r in stored)
    assert [(p["pages"], p["records"]) for p in partition_rows(url, "big")] == [(1, BIG_RECORDS)]
    assert body > 10_000_000
    # Bounded: the page is not kept once committed (nothing retained per record), and the
    # transient peak is a fixed multiple of the body. Most of that multiple is orjson's
    # parse arena (~13x the input for many small objects, measured; json.loads ~2.3x).
    assert retained < body, f"{retained / 1e6:.0f} MB still held after the run"
    assert peak < 20 * body, f"peak {peak / 1e6:.0f} MB for a {body / 1e6:.0f} MB page"
    print(f"large page: {body / 1e6:.1f} MB body, traced peak {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    print(fault_table())


# -- how a retried page looks in Prefect ------------------------------------------------------


def task_runs_once(
    c: Any, flow_run_id: Any, done: Callable[[dict[str, Any]], bool], *, what: str
) -> dict[str, Any]:
    """The flow run's task runs by name, once `done` holds for them (task runs reach the
    API through events, a moment after the flow run ends)."""
    from helpers import task_runs_of, wait_for

    def recorded() -> dict[str, Any] | None:
        by_name = {t.name: t for t in task_runs_of(c, flow_run_id)}
        return by_name if done(by_name) else None

    return wait_for(recorded, 30, what=what)


@pytest.mark.parametrize(
    ("fault_id", "states", "runs"),
    [
        ("503-then-task-retry", ["Running", "AwaitingRetry", "Retrying", "Completed"], 2),
        ("503-forever", ["Running", "AwaitingRetry", "Retrying", "Failed"], 2),
    ],
)
def test_a_retried_page_is_one_task_run_with_prefects_retry_states(
    tmp_path: Path, api: DemoAPI, fault_id: str, states: list[str], runs: int
) -> None:
    """The page the fault hits is one task run, run once per try, through the states
    Prefect's engine gives a retried task; a failure's traceback is in its logs. Pages
    before it ran once, each under the partition's task run."""
    from helpers import wait_for
    from prefect import get_client
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterTaskRunId,
    )

    path = write_config(tmp_path, api.url, {"items": SPEC})
    injected(api, next(f for f in FAULTS if f.id == fault_id))
    flow_run_id = sync_state(path).state_details.flow_run_id
    hit, before = f"items · all · page {FAULT_PAGE}", f"items · all · page {FAULT_PAGE - 1}"
    with get_client(sync_client=True) as c:
        by_name = task_runs_once(
            c, flow_run_id, lambda runs: hit in runs and runs[hit].state_name == states[-1],
            what=f"{hit} in its final state",
        )  # fmt: skip
        page = by_name[hit]
        assert page.run_count == runs and page.flow_run_run_count == 1
        history = wait_for(lambda: [s.name for s in c.read_task_run_states(page.id)]
                           if len(c.read_task_run_states(page.id)) == len(states) else None,
                           30, what="every state of the page's task run")  # fmt: skip
        assert history == states
        earlier = by_name[before]
        assert earlier.run_count == 1 and earlier.state_name == "Completed"
        for run in (page, earlier):
            [parent] = run.task_inputs["__parents__"]
            assert by_name["items · all"].id == parent.id
        wanted = ["Retry 1/1 will start 1.0 second(s) from now"]  # task_retries: 1
        if states[-1] == "Failed":
            wanted += ["Retries are exhausted", "Traceback", "HTTP 503"]
        log_filter = LogFilter(task_run_id=LogFilterTaskRunId(any_=[page.id]))

        def logged() -> str | None:  # logs reach the API in batches
            text = " ".join(log.message for log in c.read_logs(log_filter=log_filter))
            return text if all(w in text for w in wanted) else None

        wait_for(logged, 30, what=f"{wanted} in the page task run's logs")


def test_a_page_shows_as_running_only_when_it_runs_long_enough_to_be_seen(
    tmp_path: Path, api: DemoAPI
) -> None:
    """A fast page is one Completed event (its Running state folded in: start time, run
    count and run time are the task run's); a page still running after RUNNING_AFTER
    seconds was sent as Running while it ran."""
    from helpers import wait_for
    from prefect import get_client

    from pagesync.tasks.pages import RUNNING_AFTER

    path = write_config(tmp_path, api.url, {"items": SPEC})
    delay = RUNNING_AFTER * 2.5
    api.add_faults([{"kind": "slow", "delay": delay, "path": PATH, "after": FAULT_PAGE - 1}])
    flow_run_id = sync_state(path).state_details.flow_run_id
    slow, fast = f"items · all · page {FAULT_PAGE}", f"items · all · page {FAULT_PAGE - 1}"
    with get_client(sync_client=True) as c:

        def all_completed(runs: dict[str, Any]) -> bool:
            pages = [t for name, t in runs.items() if " · page " in name]
            return len(pages) == 10 and all(t.state_name == "Completed" for t in pages)

        by_name = task_runs_once(c, flow_run_id, all_completed, what="10 completed page task runs")

        def states(name: str, count: int) -> list[str] | None:
            found = [s.name for s in c.read_task_run_states(by_name[name].id)]
            return found if len(found) == count else None

        assert wait_for(lambda: states(fast, 1), 30, what="the fast page's state") == ["Completed"]
        assert wait_for(lambda: states(slow, 2), 30, what="the slow page's states") == [
            "Running",
            "Completed",
        ]
        for name in (fast, slow):
            run = by_name[name]
            assert run.run_count == 1 and run.start_time and run.end_time
            assert run.start_time < run.end_time and run.total_run_time.total_seconds() > 0
        assert by_name[slow].total_run_time.total_seconds() > RUNNING_AFTER


def test_page_events_go_through_pagesyncs_sender_and_reach_the_server(
    tmp_path: Path, api: DemoAPI
) -> None:
    """Against a Prefect API the page events are sent by `page_events.sender()` (not
    Prefect's events worker), one per fast page, and all are recorded once the flow run
    ends: the partition's end waits for them."""
    from prefect import get_client

    from pagesync.tasks import page_events

    sender = page_events.sender()
    assert sender.usable()
    before = sender.sent
    path = write_config(tmp_path, api.url, {"items": SPEC})
    flow_run_id = sync_state(path).state_details.flow_run_id
    assert sender.sent - before == 10  # 10 fast pages: one Completed event each, all sent
    with get_client(sync_client=True) as c:
        by_name = task_runs_once(
            c, flow_run_id, lambda runs: sum(" · page " in n for n in runs) == 10,
            what="10 page task runs",
        )  # fmt: skip
    pages = [t for name, t in by_name.items() if " · page " in name]
    assert all(t.state_name == "Completed" and t.flow_run_id == flow_run_id for t in pages)


def test_a_sender_that_cannot_connect_drops_events_instead_of_blocking_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No server at the API's address: the sender gives up once (a warning), sends
    nothing, and never makes a page or the partition's end wait."""
    from prefect.events.clients import PrefectEventsClient

    from pagesync.tasks import page_events

    sender = page_events.EventSender()
    assert sender.usable()
    port = free_port()
    sender._client_spec = (
        PrefectEventsClient,
        {"api_url": f"http://127.0.0.1:{port}/api", "reconnection_attempts": 0},
    )
    assert sender.related() is None
    sender.send(uuid.uuid4(), {"event": "x"})
    assert sender.flush(5) and sender.sent == 0
    assert not sender.usable()  # later partitions send Prefect's way
