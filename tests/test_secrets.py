"""Secrets never leak: not to the terminal, Prefect, the state database or the destination.

A source needs a credential (bearer token, API key in the query string, basic password)
and the state database is PostgreSQL reached through a URL with a password in it; both come
from environment variables, as the README says they should. Real `pagesync` processes sync,
then fail twice with --verbose (a next link to another host, then HTTP 500s), so error
messages, tracebacks and Prefect logs are produced. Then every place a secret could end up
is searched for it: CLI output of every command, the flow runs (parameters and states),
their logs, artifacts and task runs as the Prefect API returns them, the Prefect server's
own database file, and every column of every table in the state/destination database.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlencode
from uuid import UUID

import httpx
import orjson
import pytest
from conftest import _SERVER, STREAMS, run_cli, write_config
from helpers import assert_exactly_once, wait_for
from sqlalchemy import create_engine, inspect, text
from test_faults import JSONServer

from pagesync.core.config import Source
from pagesync.core.http import SourceClient
from pagesync.core.paginators import PageRequest
from pagesync.demo.api import DemoAPI

SECRET = "pgs-T0ken-7f3a9c1e5b2d"
PG_PASSWORD = "pgs-Passw0rd-4d8e2b6a90"
ENV = {"PAGESYNC_TEST_SECRET": SECRET, "PAGESYNC_TEST_PG_PASSWORD": PG_PASSWORD}
#: The secrets as they travel: raw, and inside a basic auth header.
PROBES = (SECRET, PG_PASSWORD, base64.b64encode(f"me:{SECRET}".encode()).decode())
AUTHS = {
    "bearer": {"type": "bearer", "token": "${PAGESYNC_TEST_SECRET}"},
    "api-key-query": {"type": "api_key", "name": "api_key", "value": "${PAGESYNC_TEST_SECRET}",
                      "in": "query"},
    "basic": {"type": "basic", "username": "me", "password": "${PAGESYNC_TEST_SECRET}"},
}  # fmt: skip
SPEC = {**STREAMS["next_url"], "params": {"_size": 200}}  # 3 pages; next_url is absolute


def leaks(where: str, value: Any) -> list[str]:
    """Where (and around what) a secret shows in `value`'s text."""
    found = []
    blob = value if isinstance(value, str) else str(value)
    for probe in PROBES:
        at = blob.find(probe)
        if at >= 0:
            found.append(f"{where}: ...{blob[max(0, at - 80) : at + len(probe) + 20]}...")
    return found


def used_credential(api: DemoAPI, kind: str) -> bool:
    """Whether the API received the secret the way `kind` sends it."""
    for r in api.requests:
        header = r["headers"].get("authorization", "")
        if kind == "bearer" and header == f"Bearer {SECRET}":
            return True
        if kind == "basic" and header == f"Basic {PROBES[2]}":
            return True
        if kind == "api-key-query" and r["query"].get("api_key") == SECRET:
            return True
    return False


@pytest.fixture
def secured() -> Iterator[DemoAPI]:
    with DemoAPI(items=600, token=SECRET) as server:
        yield server


def database_text(url: str) -> Iterator[tuple[str, Any]]:
    """Every value of every column of every table, with where it is."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
            assert {"pagesync_partitions", "pagesync_pages", "items"} <= set(tables), tables
            for table in tables:
                for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():
                    for column, value in row.items():
                        yield f"{table}.{column}", value
    finally:
        engine.dispose()


def prefect_documents(flow_run_ids: list[str]) -> Iterator[tuple[str, str]]:
    """The flow runs, their states, logs, task runs and artifacts, as the API returns them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    ids = [UUID(i) for i in flow_run_ids]
    runs = FlowRunFilter(id=FlowRunFilterId(any_=ids))
    with get_client(sync_client=True) as client:
        for flow_run_id in ids:
            yield f"flow run {flow_run_id}", client.read_flow_run(flow_run_id).model_dump_json()
            for state in client.read_flow_run_states(flow_run_id):
                yield f"flow run state {state.name}", state.model_dump_json()
        offset = 0
        while True:
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200, offset=offset
            )
            for log in page:
                yield "log", log.model_dump_json()
            if len(page) < 200:
                break
            offset += 200
        for task_run in client.read_task_runs(flow_run_filter=runs, limit=200):
            yield f"task run {task_run.name}", task_run.model_dump_json()
        for artifact in client.read_artifacts(flow_run_filter=runs, limit=200):
            yield f"artifact {artifact.key}", artifact.model_dump_json()


def prefect_logs(flow_run_ids: list[str]) -> str:
    return "\n".join(doc for where, doc in prefect_documents(flow_run_ids) if where == "log")


def all_leaks(documents: Iterable[tuple[str, Any]]) -> list[str]:
    return [hit for where, value in documents for hit in leaks(where, value)]


def assert_nothing_leaked(
    outputs: list[tuple[str, str]], db_url: str, failures: list[str]
) -> list[str]:
    """No secret in the CLI outputs, the database or Prefect; returns the flow run ids (from
    the page log) whose Prefect records were searched. `failures` are words of the errors
    the runs met, waited for in the Prefect logs (so that the logs searched include them)."""
    hits = all_leaks(outputs)
    assert not hits, "\n".join(hits)

    # The state database and the destination table: every column of every table.
    values = list(database_text(db_url))
    errors = [v for w, v in values if w == "pagesync_partitions.error" and v]
    assert errors, "no error was stored: the failing runs did not fail"
    hits = all_leaks(values)
    assert not hits, "\n".join(hits)

    # Prefect: each run's flow run (parameters, states), logs, task runs and artifacts.
    flow_run_ids = sorted(
        {str(v) for w, v in values if w == "pagesync_pages.flow_run_id" and v is not None}
    )
    assert flow_run_ids
    wait_for(
        lambda: all(words in prefect_logs(flow_run_ids) for words in failures),
        timeout=60,
        what=f"{failures} in the Prefect logs",
    )
    documents = list(prefect_documents(flow_run_ids))
    kinds = {where.split(" ")[0] for where, _ in documents}
    assert {"flow", "log", "task", "artifact"} <= kinds, kinds
    assert any(" · page " in where for where, _ in documents if where.startswith("task run"))
    hits = all_leaks(documents)
    assert not hits, "\n".join(hits)

    # The Prefect server's own database, byte for byte (its WAL included).
    blob = b"".join(f.read_bytes() for f in sorted(Path(_SERVER["home"]).glob("prefect.db*")))
    assert flow_run_ids[0].encode() in blob, "not the Prefect server these runs used"
    for probe in PROBES:
        assert probe.encode() not in blob, "a secret is stored in the Prefect server's database"
    return flow_run_ids


@pytest.mark.parametrize("kind", list(AUTHS))
def test_secrets_never_leak(tmp_path: Path, secured: DemoAPI, pg_url: str, kind: str) -> None:
    host_db = pg_url.split("@", 1)[1]
    # The runs reach PostgreSQL through a URL with a password (trust auth does not check
    # it, but it is in the URL every connection is made from); the test reads without it.
    state = f"postgresql+psycopg://postgres:${{PAGESYNC_TEST_PG_PASSWORD}}@{host_db}"
    path = write_config(
        tmp_path, secured.url, {"items": SPEC}, state=state, source={"auth": AUTHS[kind]}
    )
    assert SECRET not in path.read_text() and PG_PASSWORD not in path.read_text()
    outputs: list[tuple[str, str]] = []

    def cli(*args: str) -> Any:
        result = run_cli(*args, "-c", str(path), **ENV)
        outputs.append((f"`pagesync {' '.join(args)}`", result.stdout + result.stderr))
        return result

    # 1. A sync that works: the API accepted the credential, the PostgreSQL URL was used.
    ok = cli("run", "items", "--verbose")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert used_credential(secured, kind), "the source never received the secret"
    assert_exactly_once(pg_url, "items", [i["id"] for i in secured.items])

    # 2. A failure naming a URL: the next link points at another host (with the credential
    #    in its query string, for api-key-query: the API echoes every parameter).
    secured.clear_requests()
    secured.add_fault(kind="foreign_next", host="http://127.0.0.1:9", path="/db/items.json")
    foreign = cli("run", "items", "--full-refresh", "--verbose")
    assert foreign.returncode == 1 and "another host" in foreign.stderr, foreign.stderr
    assert used_credential(secured, kind)
    secured.clear_faults()

    # 3. A failure from the source: HTTP 500 on every try after the first page.
    secured.add_fault(kind="status", status=500, after=1, times=-1, path="/db/items.json")
    failing = cli("run", "items", "--full-refresh", "--verbose")
    assert failing.returncode == 1 and "HTTP 500" in failing.stderr, failing.stderr
    secured.clear_faults()

    # 4. Everything a person or a script reads back.
    for args in (("state",), ("state", "--json"), ("history", "items", "--json"),
                 ("state", "export", "items"), ("check",)):  # fmt: skip
        assert cli(*args).returncode == 0, outputs[-1]

    flow_run_ids = assert_nothing_leaked(outputs, pg_url, ["another host", "HTTP 500"])
    assert len(flow_run_ids) == 3, flow_run_ids


def test_a_query_key_of_any_name_is_hidden_even_when_the_api_echoes_it(tmp_path: Path) -> None:
    """An API key in a query parameter pagesync cannot guess is secret (`appid`), and an API
    that echoes the request (key included) in its next links and error bodies."""
    box: dict[str, Any] = {"fail": False}

    def respond(path: str, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        echo = f"{box['url']}{path}?{urlencode(query)}"
        if query.get("appid") != SECRET:
            return 401, {}, orjson.dumps({"error": "bad appid", "request": echo})
        page = int(query.get("page", "1"))
        if box["fail"] and page == 2:
            return 500, {}, orjson.dumps({"error": "upstream timed out", "request": echo})
        items = [{"id": (page - 1) * 10 + i, "name": f"item {i}"} for i in range(1, 11)]
        nxt = f"{box['url']}{path}?{urlencode({**query, 'page': page + 1})}" if page < 3 else None
        return 200, {}, orjson.dumps({"items": items, "next": nxt})

    with JSONServer(respond) as server:
        box["url"] = server.url
        spec = {"path": "/items", "records": "items", "primary_key": ["id"],
                "paginator": {"type": "next_url", "path": "next"}}  # fmt: skip
        auth = {
            "type": "api_key",
            "name": "appid",
            "value": "${PAGESYNC_TEST_SECRET}",
            "in": "query",
        }
        path = write_config(tmp_path, server.url, {"items": spec}, source={"auth": auth})
        outputs: list[tuple[str, str]] = []
        for args, code in ((("check",), 0), (("run", "items", "--verbose"), 0)):
            result = run_cli(*args, "-c", str(path), **ENV)
            assert result.returncode == code, result.stdout + result.stderr
            outputs.append((f"`pagesync {' '.join(args)}`", result.stdout + result.stderr))
        assert any(r["query"].get("appid") == SECRET for r in server.requests)
        assert any(r["query"].get("page") == "3" for r in server.requests), "echoed links followed"
        box["fail"] = True
        result = run_cli("run", "items", "--full-refresh", "--verbose", "-c", str(path), **ENV)
        assert result.returncode == 1 and "HTTP 500" in result.stderr, result.stderr
        assert "upstream timed out" in result.stderr, "the error should quote the API's body"
        outputs.append(("`pagesync run items` (failing)", result.stdout + result.stderr))
    assert_nothing_leaked(outputs, f"sqlite:///{tmp_path / 'pagesync.db'}", ["HTTP 500"])


# -- the hiding itself, in process -------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "bearer", "token": ""},
        {"type": "api_key", "name": "appid", "value": "", "in": "query"},
        {"type": "basic", "username": "me", "password": ""},
    ],
    ids=["bearer", "api-key-query", "basic"],
)
def test_every_form_of_a_credential_is_hidden(auth: dict[str, Any]) -> None:
    secret = "p@ss w/rd+&é:*"
    auth = {**auth, **{k: secret for k in ("token", "value", "password") if k in auth}}
    client = SourceClient(Source.model_validate({"base_url": "http://127.0.0.1:9", "auth": auth}))
    forms = [secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             quote_plus(secret, safe="*:/")]  # fmt: skip
    if auth["type"] == "basic":
        forms.append(base64.b64encode(f"me:{secret}".encode()).decode())
    echoed = " | ".join(f"/items?appid={form}&page=2" for form in forms)
    shown = [
        client.hide(echoed),  # an error body quoting requests
        client.redact(
            f"http://127.0.0.1:9/k/{quote(secret, safe='')}/items?q={quote(secret)}&page=2"
        ),
        client.redact(httpx.URL("http://127.0.0.1:9/items", params={"q": secret, "page": 2})),
    ]
    for words in shown:
        for form in forms:
            assert form not in words, words
        assert secret not in unquote(words) and secret not in unquote_plus(words), words
        assert "page=2" in words and "***" in words, words  # the rest of the text is kept
    client.close()


def test_an_oauth2_access_token_is_hidden_too() -> None:
    with DemoAPI(items=50) as api:
        api.add_oauth_client("pagesync", "client-s3cret-value")
        source = Source.model_validate({"base_url": api.url, "auth": {
            "type": "oauth2_client_credentials", "token_url": f"{api.url}/oauth/token",
            "client_id": "pagesync", "client_secret": "client-s3cret-value"}})  # fmt: skip
        client = SourceClient(source)
        assert client.get(PageRequest("/cursor/items", {"limit": 10})).status_code == 200
        token = api.requests[-1]["headers"]["authorization"].removeprefix("Bearer ")
        assert token and api.tokens_issued == 1
        shown = client.hide(
            f'{{"error": "token {token} expired", "secret": "client-s3cret-value"}}'
        )
        assert token not in shown and "client-s3cret-value" not in shown
        assert shown == '{"error": "token *** expired", "secret": "***"}'
        client.close()
