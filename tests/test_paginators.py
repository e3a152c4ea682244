"""Paginators: from one response to the next request, as pure functions.

Unit tests feed hand-built httpx responses; property tests drive each kind over a
simulated API and check that every record comes back exactly once and the walk ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagesync.core import config as cfg
from pagesync.core.errors import ExtractError
from pagesync.core.paginators import (
    Cursor,
    LinkHeader,
    NextUrl,
    Offset,
    PageNumber,
    PageRequest,
    Paginator,
    SinglePage,
    base_request,
    make_paginator,
)

BASE_URL = "http://api.test/v1/"
BASE = PageRequest("items", {"category": "books"})


def response(
    url: str = "http://api.test/v1/items?category=books",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A response with its request attached, so response.url works."""
    return httpx.Response(
        200,
        json=body if body is not None else {},
        headers=headers,
        request=httpx.Request("GET", url),
    )


def paginator(**spec: Any) -> Paginator:
    """A paginator from its config, exactly as a stream would build it."""
    stream = cfg.Stream.model_validate(
        {"source": "s", "path": "/", "primary_key": ["id"], "paginator": spec}
    )
    return make_paginator(stream.paginator)


def test_make_paginator_picks_the_kind() -> None:
    assert isinstance(paginator(type="next_url"), NextUrl)
    assert isinstance(paginator(type="cursor", path="meta.next"), Cursor)
    assert isinstance(paginator(type="link_header"), LinkHeader)
    assert isinstance(paginator(type="offset"), Offset)
    assert isinstance(paginator(type="page_number"), PageNumber)
    assert isinstance(paginator(type="single"), SinglePage)


def test_stable_tokens_flag() -> None:
    assert paginator(type="cursor", path="n").stable_tokens is False
    assert paginator(type="cursor", path="n", stable_tokens=True).stable_tokens is True
    assert paginator(type="single").stable_tokens is True


# -- next_url ---------------------------------------------------------------------------------


def test_next_url_first_request_is_the_base() -> None:
    p = paginator(type="next_url", path="links.next")
    assert p.first() is None
    assert p.request(BASE, None) == BASE


def test_next_url_absolute() -> None:
    p = paginator(type="next_url", path="links.next")
    body = {"links": {"next": "https://other.test/items?after=abc&limit=5"}}
    token = p.next(None, response(body=body), body, [{"id": 1}])
    assert token == "https://other.test/items?after=abc&limit=5"
    # The URL carries its own query: the base params are not added again.
    assert p.request(BASE, token) == PageRequest("https://other.test/items?after=abc&limit=5")


@pytest.mark.parametrize("kind", ["next_url", "link_header"])
@pytest.mark.parametrize(
    "link", ["https://other.test/items?after=abc", "HTTP://api.test/v1/items?after=a%2Fb"]
)
def test_an_absolute_link_is_taken_as_sent(
    kind: str, link: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joining parses both URLs again; an absolute link needs none of it (a page's CPU)."""

    def no_join(*_: Any) -> None:
        raise AssertionError("an absolute link was joined")

    monkeypatch.setattr(httpx.URL, "join", no_join)
    p = paginator(type=kind, path="next") if kind == "next_url" else paginator(type=kind)
    body = {"next": link}
    headers = {"link": f'<{link}>; rel="next"'}
    assert p.next(None, response(body=body, headers=headers), body, [{"id": 1}]) == link


@pytest.mark.parametrize(
    ("next_url", "expected"),
    [
        ("/v1/items?after=abc", "http://api.test/v1/items?after=abc"),
        ("?after=abc", "http://api.test/v1/items?after=abc"),
        ("items?after=abc", "http://api.test/v1/items?after=abc"),
        ("../v2/items?after=abc", "http://api.test/v2/items?after=abc"),
    ],
)
def test_next_url_relative_resolves_against_the_response_url(next_url: str, expected: str) -> None:
    p = paginator(type="next_url", path="next_url")
    body = {"next_url": next_url}
    resp = response("http://api.test/v1/items?category=books&after=xyz", body)
    assert p.next(None, resp, body, []) == expected


@pytest.mark.parametrize("body", [{}, {"next_url": None}, {"next_url": ""}, {"other": 1}])
def test_next_url_missing_or_null_ends(body: dict[str, Any]) -> None:
    p = paginator(type="next_url", path="next_url")
    assert (
        p.next("http://api.test/v1/items?after=x", response(body=body), body, [{"id": 1}]) is None
    )


# -- cursor -------------------------------------------------------------------------------------


def test_cursor_token_at_dotted_path_sent_as_param() -> None:
    p = paginator(type="cursor", path="meta.paging.next", param="after")
    assert p.first() is None
    assert p.request(BASE, None) == BASE
    body = {"meta": {"paging": {"next": "tok-2"}}, "data": []}
    token = p.next(None, response(body=body), body, [{"id": 1}])
    assert token == "tok-2"
    req = p.request(BASE, token)
    assert req == PageRequest("items", {"category": "books", "after": "tok-2"})
    assert BASE.params == {"category": "books"}  # the base request is not modified


def test_cursor_integer_token_kept_as_is() -> None:
    p = paginator(type="cursor", path="next", param="since")
    body = {"next": 1200}
    assert p.next(None, response(body=body), body, [{"id": 1}]) == 1200
    assert p.request(BASE, 1200).params["since"] == 1200


@pytest.mark.parametrize(
    "body", [{"meta": {"next": ""}}, {"meta": {"next": None}}, {"meta": {}}, {}, {"meta": None}]
)
def test_cursor_empty_or_missing_ends(body: dict[str, Any]) -> None:
    p = paginator(type="cursor", path="meta.next")
    assert p.next("tok-1", response(body=body), body, [{"id": 1}]) is None


def test_cursor_zero_is_a_token_not_the_end() -> None:
    p = paginator(type="cursor", path="next")
    body = {"next": 0}
    assert p.next(None, response(body=body), body, [{"id": 1}]) == 0


# -- link_header --------------------------------------------------------------------------------


def test_link_header_rel_next() -> None:
    p = paginator(type="link_header")
    assert p.first() is None
    assert p.request(BASE, None) == BASE
    link = (
        '<https://api.test/v1/items?page=1>; rel="prev", '
        '<https://api.test/v1/items?page=3&per_page=10>; rel="next", '
        '<https://api.test/v1/items?page=9>; rel="last"'
    )
    token = p.next(None, response(headers={"Link": link}, body=[]), [], [{"id": 1}])
    assert token == "https://api.test/v1/items?page=3&per_page=10"
    assert p.request(BASE, token) == PageRequest(token)


def test_link_header_relative_target() -> None:
    p = paginator(type="link_header")
    resp = response(
        "http://api.test/v1/items?page=1", [], {"Link": '</v1/items?page=2>; rel="next"'}
    )
    assert p.next(None, resp, [], [{"id": 1}]) == "http://api.test/v1/items?page=2"


def test_link_header_custom_rel() -> None:
    p = paginator(type="link_header", rel="older")
    link = '<http://api.test/a>; rel="newer", <http://api.test/b>; rel="older"'
    assert p.next(None, response(headers={"Link": link}, body=[]), [], []) == "http://api.test/b"


@pytest.mark.parametrize("headers", [{}, {"Link": '<http://api.test/v1/items?page=1>; rel="prev"'}])
def test_link_header_without_next_ends(headers: dict[str, str]) -> None:
    p = paginator(type="link_header")
    assert p.next(None, response(headers=headers, body=[]), [], [{"id": 1}]) is None


# -- offset -------------------------------------------------------------------------------------


def test_offset_requests_and_advances_by_limit() -> None:
    p = paginator(type="offset", limit=3, limit_param="take", offset_param="skip")
    assert p.first() == 0
    assert p.request(BASE, 0) == PageRequest("items", {"category": "books", "take": 3, "skip": 0})
    full = [{"id": i} for i in range(3)]
    assert p.next(0, response(), {}, full) == 3
    assert p.request(BASE, 3).params == {"category": "books", "take": 3, "skip": 3}
    assert p.next(3, response(), {}, full) == 6


@pytest.mark.parametrize("count", [0, 1, 2])
def test_offset_short_page_ends(count: int) -> None:
    p = paginator(type="offset", limit=3)
    assert p.next(6, response(), {}, [{"id": i} for i in range(count)]) is None


# -- page_number --------------------------------------------------------------------------------


def test_page_number_requests_and_advances() -> None:
    p = paginator(type="page_number", param="p", start=0)
    assert p.first() == 0
    assert p.request(BASE, 0) == PageRequest("items", {"category": "books", "p": 0})
    assert p.next(0, response(), {}, [{"id": 1}]) == 1
    assert p.next(1, response(), {}, [{"id": 1}]) == 2


def test_page_number_empty_page_ends() -> None:
    p = paginator(type="page_number")
    assert p.first() == 1
    assert p.next(4, response(), {}, []) is None
    # Without a size a short page is not the last: only an empty one is.
    assert p.next(4, response(), {}, [{"id": 1}]) == 5


def test_page_number_with_size_short_page_ends() -> None:
    p = paginator(type="page_number", size=3, size_param="per_page")
    assert p.request(BASE, 2) == PageRequest(
        "items", {"category": "books", "page": 2, "per_page": 3}
    )
    assert p.next(2, response(), {}, [{"id": i} for i in range(3)]) == 3
    assert p.next(3, response(), {}, [{"id": i} for i in range(2)]) is None
    assert p.next(3, response(), {}, []) is None


def test_page_number_size_without_param_is_not_sent() -> None:
    p = paginator(type="page_number", size=3)
    assert p.request(BASE, 1).params == {"category": "books", "page": 1}


# -- single -------------------------------------------------------------------------------------


def test_single_page() -> None:
    p = paginator(type="single")
    assert p.first() is None
    assert p.request(BASE, None) == BASE
    body = {"next_url": "http://api.test/more", "meta": {"next": "x"}}
    assert p.next(None, response(body=body), body, [{"id": 1}] * 100) is None


# -- property: every record exactly once, and the walk ends ---------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def _serve(records: list[int], k: int, kind: str) -> Handler:
    """A simulated API over `records` with page size `k`, in one pagination style."""

    def page(start: int) -> list[dict[str, int]]:
        return [{"id": r} for r in records[start : start + k]]

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params
        assert q.get("category") == "books"  # the stream's params reach every page
        if kind in ("next_url_abs", "next_url_rel"):
            start = int(q.get("after", 0))
            end = start + k
            nxt = None
            if end < len(records):
                path = f"/v1/items?category=books&after={end}"
                nxt = f"http://api.test{path}" if kind == "next_url_abs" else path
            return httpx.Response(200, json={"data": page(start), "next": nxt}, request=request)
        if kind == "cursor":
            start = int(q.get("cursor") or 0)
            end = start + k
            token = str(end) if end < len(records) else ""
            return httpx.Response(
                200, json={"data": page(start), "meta": {"next": token}}, request=request
            )
        if kind == "link_header":
            start = int(q.get("from", 0))
            end = start + k
            headers = {}
            if end < len(records):
                headers["Link"] = f'</v1/items?category=books&from={end}>; rel="next"'
            return httpx.Response(200, json=page(start), headers=headers, request=request)
        if kind == "offset":
            assert int(q["limit"]) == k
            return httpx.Response(200, json={"data": page(int(q["offset"]))}, request=request)
        if kind in ("page_number", "page_number_sized"):
            number = int(q["page"])
            return httpx.Response(200, json={"data": page((number - 1) * k)}, request=request)
        raise AssertionError(kind)

    return handler


def _specs(k: int) -> dict[str, dict[str, Any]]:
    return {
        "next_url_abs": {"type": "next_url", "path": "next"},
        "next_url_rel": {"type": "next_url", "path": "next"},
        "cursor": {"type": "cursor", "path": "meta.next", "param": "cursor"},
        "link_header": {"type": "link_header"},
        "offset": {"type": "offset", "limit": k},
        "page_number": {"type": "page_number"},
        "page_number_sized": {"type": "page_number", "size": k},
    }


def _walk(p: Paginator, handler: Handler, max_pages: int) -> tuple[list[int], int]:
    """Drive a paginator the way the engine does; returns the ids seen and the page count."""
    base = PageRequest("items", {"category": "books"})
    token = p.first()
    seen: list[int] = []
    for pages in range(1, max_pages + 1):
        req = p.request(base, token)
        url = httpx.URL(BASE_URL).join(req.url)
        if req.params:
            url = url.copy_merge_params(req.params)
        resp = handler(httpx.Request("GET", url))
        body = resp.json()
        records = body if isinstance(body, list) else body["data"]
        seen.extend(r["id"] for r in records)
        token = p.next(token, resp, body, records)
        if token is None:
            return seen, pages
    raise AssertionError(f"no end after {max_pages} pages")


KINDS = list(_specs(1))


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(st.integers(), max_size=60, unique=True),
    k=st.integers(min_value=1, max_value=12),
    kind=st.sampled_from(KINDS),
)
def test_every_record_exactly_once_and_terminates(records: list[int], k: int, kind: str) -> None:
    p = paginator(**_specs(k)[kind])
    bound = len(records) // k + 2
    seen, pages = _walk(p, _serve(records, k, kind), bound)
    assert seen == records
    # One page per k records, plus at most one empty page to learn it was the last.
    assert pages <= max(1, -(-len(records) // k)) + 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k"), [(0, 5), (5, 5), (10, 5), (11, 5), (1, 1)])
def test_boundaries_exactly_once(kind: str, n: int, k: int) -> None:
    records = list(range(100, 100 + n))
    seen, _ = _walk(paginator(**_specs(k)[kind]), _serve(records, k, kind), n // k + 2)
    assert seen == records


# -- issue 17: tokens in headers and bodies, shared stops, GraphQL -------------------------


def test_token_goes_into_a_nested_body_path_without_touching_the_template() -> None:
    template = PageRequest("search", json={"size": 10, "page": {"size": 10}})
    p = paginator(type="cursor", path="next", param="page.after", **{"in": "body"})
    req = p.request(template, "t2")
    assert req.method == "POST" and req.json == {"size": 10, "page": {"size": 10, "after": "t2"}}
    assert template.json == {"size": 10, "page": {"size": 10}}


def test_header_cursor_reads_a_response_header_and_sends_a_header() -> None:
    p = paginator(type="header_cursor", header="X-Next", param="X-Cursor", **{"in": "header"})
    assert p.advance(None, response(headers={"X-Next": "abc"}), {}, [{"id": 1}]) == "abc"
    assert p.advance("abc", response(), {}, [{"id": 1}]) is None
    assert p.request(BASE, "abc").headers == {"X-Cursor": "abc"}


def test_has_more_false_stops_and_a_missing_path_names_the_key() -> None:
    p = paginator(type="last_record", field="id", has_more="meta.has_more")
    body = {"meta": {"has_more": False}, "data": []}
    assert p.advance(None, response(), body, [{"id": 7}]) is None
    body["meta"]["has_more"] = True
    assert p.advance(None, response(), body, [{"id": 7}]) == 7
    with pytest.raises(ExtractError, match=r"paginator.has_more: 'meta.has_more' not found.*"
                       r"it holds keys data, more"):  # fmt: skip
        p.advance(None, response(), {"data": [], "more": True}, [{"id": 7}])


def test_offset_stops_at_the_total_and_names_its_cap() -> None:
    p = paginator(type="offset", limit=10, total="count", max_offset=20)
    full = [{"id": i} for i in range(10)]
    assert p.advance(10, response(), {"count": 20}, full) is None  # no empty page fetched
    assert p.advance(0, response(), {"count": 25}, full) == 10
    with pytest.raises(ExtractError, match="needs offset 30, past the API's cap of 20"):
        p.advance(20, response(), {"count": 99}, full)


def test_graphql_records_next_and_errors() -> None:
    p = paginator(type="graphql", query="q", connection="data.c", variables={"first": 2})
    req = p.request(BASE, "end1")
    assert req.json == {"query": "q", "variables": {"first": 2, "cursor": "end1"}}
    body = {"data": {"c": {"edges": [{"node": {"id": 1}}], "pageInfo": {
        "hasNextPage": True, "endCursor": "e2"}}}}  # fmt: skip
    assert p.records(body) == [{"id": 1}] and p.advance(None, response(), body, []) == "e2"
    throttled = {"errors": [{"message": "x", "extensions": {"code": "THROTTLED"}}]}
    with pytest.raises(ExtractError, match="GraphQL error") as err:
        p.records(throttled)
    assert err.value.transient
    with pytest.raises(ExtractError) as err:
        p.records({"errors": [{"message": "Field 'x' doesn't exist"}]})
    assert not err.value.transient


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("query", {"params": {"limit": 5, "since": "2024"}}),
        ("header", {"headers": {"X-Since": "2024"}}),
        ("body", {"json": {"size": 5, "filter": {"since": "2024"}}, "method": "POST"}),
    ],
)
def test_incremental_filter_goes_where_the_cursor_says(where: str, expect: dict) -> None:
    param = {"query": "since", "header": "X-Since", "body": "filter.since"}[where]
    stream = cfg.Stream.model_validate({
        "source": "s", "path": "/x", "primary_key": ["id"], "params": {"limit": 5},
        "body": {"size": 5} if where == "body" else None,
        "cursor": {"field": "updated_at", "param": param, "in": where},
    })  # fmt: skip
    req = base_request(stream, "/x", {}, "2024")
    for attr, value in expect.items():
        assert getattr(req, attr) == value
