"""The pagination styles of real APIs (issue 17), each against its demo API endpoint:
every record exactly once, the stop where the API says (no extra request), resume after a
SIGKILL from the committed page's token, and one-line errors that name what to fix.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from conftest import run_cli, write_config
from helpers import assert_counters_match_log, assert_exactly_once, committed_pages, partition_rows

from pagesync.demo.api import DemoAPI

PAGE = 200  # the api fixture serves 2,000 items: 10 full pages
GRAPHQL = (  # noqa: UP031 - braces of GraphQL are not format fields
    "query($first: Int, $after: String, $updatedSince: String) {"
    " items(first: $first, after: $after, updatedSince: $updatedSince) {"
    " %s pageInfo { hasNextPage endCursor } } }"
)

#: name -> (stream config, requests a full sync makes)
STYLES: dict[str, tuple[dict[str, Any], int]] = {
    "header_cursor": ({
        "path": "/header/items", "params": {"limit": PAGE}, "records": "data",
        "paginator": {"type": "header_cursor", "header": "X-Next-Cursor", "param": "X-Cursor",
                      "in": "header", "stable_tokens": True},
    }, 10),
    "stripe": ({
        "path": "/stripe/items", "params": {"limit": PAGE}, "records": "data",
        "paginator": {"type": "last_record", "field": "id", "param": "starting_after",
                      "has_more": "has_more"},
    }, 10),
    "drf_404": ({
        "path": "/drf/items", "params": {"page_size": PAGE}, "records": "results",
        "paginator": {"type": "page_number", "stable_tokens": True},
    }, 11),  # page 11 answers 404 {"detail": "Invalid page."}: the end, by default
    "drf_total": ({
        "path": "/drf/items", "params": {"page_size": PAGE}, "records": "results",
        "paginator": {"type": "page_number", "total": "count", "stable_tokens": True},
    }, 10),
    "offset_total": ({
        "path": "/offset/items", "records": "results",
        "paginator": {"type": "offset", "limit": PAGE, "total": "count", "stable_tokens": True},
    }, 10),
    "search_after": ({
        "path": "/search/items", "body": {"size": PAGE}, "records": "hits.hits",
        "paginator": {"type": "last_record", "field": "sort", "param": "search_after",
                      "in": "body"},
    }, 11),  # search_after has no stop flag: the empty page ends it
    "notion": ({
        "path": "/notion/items", "body": f'{{"page_size": {PAGE}}}', "records": "results",
        "paginator": {"type": "cursor", "path": "next_cursor", "param": "start_cursor",
                      "in": "body", "has_more": "has_more", "stable_tokens": True},
    }, 10),
    "graphql_edges": ({
        "path": "/graphql",
        "paginator": {"type": "graphql", "query": GRAPHQL % "edges { node { id updated_at } }",
                      "variables": {"first": PAGE}, "connection": "data.items",
                      "cursor_variable": "after", "stable_tokens": True},
    }, 10),
    "graphql_nodes": ({
        "path": "/graphql",
        "cursor": {"field": "updated_at", "param": "variables.updatedSince", "in": "body"},
        "paginator": {"type": "graphql", "query": GRAPHQL % "nodes { id updated_at }",
                      "variables": {"first": PAGE}, "connection": "data.items",
                      "cursor_variable": "after"},
    }, 10),
}  # fmt: skip


def spec(style: str) -> dict[str, Any]:
    return {"primary_key": ["id"], **STYLES[style][0]}


def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'p.db'}"


def signature(request: dict[str, Any]) -> bytes:
    """What names a page: its query, token header and body."""
    token = request["headers"].get("x-cursor")
    return orjson.dumps([request["query"], token, request["json"]], option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("style", list(STYLES))
def test_style_syncs_every_record_once_and_stops_where_the_api_says(
    tmp_path: Path, api: DemoAPI, style: str
) -> None:
    path = write_config(tmp_path, api.url, {style: spec(style)}, state=db(tmp_path))
    result = run_cli("run", style, "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(db(tmp_path), style, [i["id"] for i in api.items])
    assert len(api.requests) == STYLES[style][1]
    assert len({signature(r) for r in api.requests}) == len(api.requests), "a page fetched twice"


@pytest.mark.parametrize("style", list(STYLES))
def test_style_resumes_after_sigkill_from_the_committed_page(
    tmp_path: Path, api: DemoAPI, style: str
) -> None:
    path = write_config(tmp_path, api.url, {style: spec(style)}, state=db(tmp_path))
    result = run_cli("run", style, "-c", str(path), PAGESYNC_CRASH_AT="after_commit:3")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert committed_pages(db(tmp_path), style) == 3
    first_run = [signature(r) for r in api.requests]
    [state] = [p["state"] for p in partition_rows(db(tmp_path), style)]
    api.clear_requests()

    result = run_cli("run", style, "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_exactly_once(db(tmp_path), style, [i["id"] for i in api.items])
    assert_counters_match_log(db(tmp_path), style)
    again = [r for r in api.requests if signature(r) in first_run[:3]]
    assert not again, f"committed pages fetched again: {again[:1]}"
    if "cursor" in STYLES[style][0]:  # resumed by the cursor filter, in the body
        committed = orjson.loads(state)["cursor"]
        assert api.requests[0]["json"]["variables"]["updatedSince"] == committed
        assert len(api.requests) <= STYLES[style][1] - 3 + 1
    else:  # resumed by the stored token: from page 4, every later page once
        assert len(api.requests) == STYLES[style][1] - 3


def test_max_pages_ends_the_partition(tmp_path: Path, api: DemoAPI) -> None:
    stream = spec("header_cursor")
    stream["paginator"] = {**stream["paginator"], "max_pages": 3}
    path = write_config(tmp_path, api.url, {"few": stream}, state=db(tmp_path))
    result = run_cli("run", "few", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(api.requests) == 3
    assert_exactly_once(db(tmp_path), "few", [i["id"] for i in api.items[: 3 * PAGE]])


def test_graphql_throttled_error_in_a_200_is_retried(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"gql": spec("graphql_edges")}, state=db(tmp_path))
    api.add_fault(kind="graphql_throttled", path="/graphql", after=2)
    result = run_cli("run", "gql", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["fault"] for r in api.requests].count("graphql_throttled") == 1
    assert_exactly_once(db(tmp_path), "gql", [i["id"] for i in api.items])


def test_response_action_skips_a_partition_request(tmp_path: Path, api: DemoAPI) -> None:
    stream = {
        "path": "/categories/{value}/items", "params": {"limit": 500}, "records": "data.items",
        "primary_key": ["id"], "partitions": {"type": "list", "values": ["books", "vinyl"]},
        "paginator": {"type": "cursor", "path": "meta.next"},
        "response_actions": [{"status": 404, "contains": "unknown category", "action": "skip"}],
    }  # fmt: skip
    path = write_config(tmp_path, api.url, {"cats": stream}, state=db(tmp_path))
    result = run_cli("run", "cats", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    books = [i["id"] for i in api.items if i["category"] == "books"]
    assert_exactly_once(db(tmp_path), "cats", books)
    parts = {p["partition"]: p for p in partition_rows(db(tmp_path), "cats")}
    assert parts["vinyl"]["status"] == "complete" and parts["vinyl"]["records"] == 0


def test_drf_404_on_the_first_page_is_still_an_error(tmp_path: Path, api: DemoAPI) -> None:
    stream = {**spec("drf_404"), "paginator": {"type": "page_number", "start": 99}}
    path = write_config(tmp_path, api.url, {"drf": stream}, state=db(tmp_path))
    result = run_cli("run", "drf", "-c", str(path))
    assert result.returncode == 1
    assert "HTTP 404" in result.stdout + result.stderr


# -- errors that name what to fix -----------------------------------------------------------


def one_error_line(output: str, *needles: str) -> str:
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert lines, f"no line with {needles} in:\n{output}"
    return lines[0]


CHECK_ERRORS = {
    "records_path": (
        {**spec("header_cursor"), "records": "items"},
        ("records: 'items' not found", "it holds keys data"),
    ),
    "has_more_path": (
        {**spec("stripe"), "paginator": {"type": "last_record", "has_more": "meta.has_more"}},
        ("paginator.has_more: 'meta.has_more' not found", "object, data, has_more"),
    ),
    "graphql_error": (
        {**spec("graphql_edges"), "paginator": {**spec("graphql_edges")["paginator"],
                                                "query": "{ orders { nodes { id } } }"}},
        ("paginator.query: the API answered a GraphQL error: Cannot query field",),
    ),
    "total_path": (
        {**spec("drf_total"), "paginator": {"type": "page_number", "total": "meta.count"}},
        ("paginator.total: 'meta.count' not found", "count, next, previous, results"),
    ),
    "connection_path": (
        {**spec("graphql_edges"), "paginator": {**spec("graphql_edges")["paginator"],
                                                "connection": "data.orders"}},
        ("paginator.connection: 'data.orders' not found", "items at 'data'"),
    ),
    "cursor_field": (
        {**spec("header_cursor"), "cursor": {"field": "modified", "param": "since"}},
        ("cursor.field: 'modified' is in none of the page's records", "it holds keys id, name"),
    ),
    "body_not_json": (
        {**spec("notion"), "body": '{"page_size": 200'},
        ("streams.body_not_json.body: not valid JSON",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CHECK_ERRORS))
def test_check_names_stream_and_key_and_exits_2(tmp_path: Path, api: DemoAPI, case: str) -> None:
    stream, needles = CHECK_ERRORS[case]
    path = write_config(tmp_path, api.url, {case: stream}, state=db(tmp_path))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    one_error_line(result.stdout + result.stderr, case, *needles)


RUN_ERRORS = {
    "cursor_field": (
        {**spec("header_cursor"), "cursor": {"field": "modified", "param": "since"}},
        ("cursor.field: 'modified' is in none of the page's records", "it holds keys id, name"),
    ),
    "offset_cap": (
        {"path": "/capped/items", "records": "results", "primary_key": ["id"],
         "paginator": {"type": "offset", "limit": PAGE, "total": "total", "max_offset": 1000}},
        ("paginator.max_offset", "offset 1200", "cap of 1000"),
    ),
    "graphql_failure": (
        spec("graphql_edges"),
        ("paginator.query: the API answered a GraphQL error: Internal server error",),
    ),
    "records_path": (
        {**spec("header_cursor"), "records": "items"},
        ("records: 'items' not found", "it holds keys data"),
    ),
    "has_more_path": (
        {**spec("stripe"), "paginator": {"type": "last_record", "has_more": "meta.has_more"}},
        ("paginator.has_more: 'meta.has_more' not found", "object, data, has_more"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_errors_name_stream_and_key_and_exit_1(tmp_path: Path, api: DemoAPI, case: str) -> None:
    stream, needles = RUN_ERRORS[case]
    path = write_config(tmp_path, api.url, {case: stream}, state=db(tmp_path))
    if case == "graphql_failure":
        api.add_fault(kind="graphql_error", path="/graphql", after=1, times=-1)
    result = run_cli("run", case, "-c", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    one_error_line(result.stdout + result.stderr, f"stream {case}", *needles)
    if case == "offset_cap":  # pages before the cap are kept; offset 1200 never requested
        assert committed_pages(db(tmp_path), case) == 5
        assert all(int(r["query"]["offset"]) <= 1000 for r in api.requests)


def test_readme_examples_are_valid_and_read_their_first_page(tmp_path: Path, api: DemoAPI) -> None:
    """The README's worked example of each style, copied as a user would: every one passes
    `pagesync check`, which reads its first page as a run does."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Pagination styles of real APIs", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    streams = yaml.safe_load("streams:\n" + block)["streams"]
    kinds = {s["paginator"]["type"] for s in streams.values()}
    assert {"header_cursor", "last_record", "page_number", "offset", "cursor", "graphql"} <= kinds
    streams.pop("by_category")  # a partitioned path: check has no partition value to fill in
    path = write_config(tmp_path, api.url, {}, state=db(tmp_path))
    data = yaml.safe_load(path.read_text())
    data["streams"] = streams
    path.write_text(yaml.safe_dump(data))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("answered 200") == len(streams)


@pytest.mark.parametrize("style", ["notion", "graphql_edges", "stripe"])
def test_switchable_faults_work_on_the_new_endpoints(
    tmp_path: Path, api: DemoAPI, style: str
) -> None:
    path = write_config(tmp_path, api.url, {style: spec(style)}, state=db(tmp_path))
    where = STYLES[style][0]["path"]
    api.add_faults([
        {"kind": "status", "status": 503, "path": where, "after": 1},
        {"kind": "truncate", "path": where, "after": 4},
        {"kind": "reset", "path": where, "after": 7},
    ])  # fmt: skip
    result = run_cli("run", style, "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    faults = [r["fault"] for r in api.requests if r["fault"]]
    assert sorted(faults) == ["reset", "status", "truncate"]
    assert_exactly_once(db(tmp_path), style, [i["id"] for i in api.items])
