"""The demo API is the ground truth for every integration test, so check it against itself:
each endpoint walked with its own pagination must yield every item exactly once, in order,
and each fault must look to an httpx client the way the connector tests expect."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import httpx
import pytest
from conftest import cleaned

from pagesync.demo.api import (
    CATEGORIES,
    MAX_PAGE_SIZE,
    DemoAPI,
    decode_token,
    encode_token,
    main,
    make_items,
    timestamp_step,
)

# Building an httpx.Client loads CA certificates (tens of ms); share one context.
SSL_CONTEXT = ssl.create_default_context()
N_ITEMS = 200
SIZE = 7  # not a multiple of 3, so pages split groups of equal updated_at

Page = list[dict[str, Any]]


def make_client(url: str, timeout: float = 5) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, verify=SSL_CONTEXT)


@pytest.fixture(scope="module")
def server() -> Iterator[DemoAPI]:
    with DemoAPI(items=N_ITEMS) as api:
        yield api


@pytest.fixture
def api(server: DemoAPI) -> Iterator[DemoAPI]:
    """The shared server, with no faults and an empty log on both sides of each test."""
    yield from cleaned(server)


@pytest.fixture(scope="module")
def shared_client(server: DemoAPI) -> Iterator[httpx.Client]:
    with make_client(server.url) as c:
        yield c


@pytest.fixture
def client(api: DemoAPI, shared_client: httpx.Client) -> httpx.Client:
    return shared_client


@pytest.fixture(scope="module")
def big() -> Iterator[DemoAPI]:
    with DemoAPI(items=MAX_PAGE_SIZE + 1) as api:
        yield api


# --------------------------------------------------------------------------- walkers


def walk_datasette(c: httpx.Client, params: dict[str, Any], path: str = "") -> list[Page]:
    pages, r = [], c.get("/db/items.json", params={"_size": SIZE, "_shape": "objects", **params})
    while True:
        body = r.raise_for_status().json()
        pages.append(body["rows"])
        if body["next_url"] is None:
            assert body["next"] is None
            return pages
        assert body["next_url"].startswith(str(c.base_url).rstrip("/") + "/db/items.json?")
        assert f"_next={body['next']}" in body["next_url"]
        r = c.get(body["next_url"])


def walk_next(c: httpx.Client, params: dict[str, Any], path: str = "") -> list[Page]:
    pages, r = [], c.get("/next/items", params={"limit": SIZE, **params})
    while True:
        body = r.raise_for_status().json()
        pages.append(body["data"]["items"])
        if body["next_url"] is None:
            return pages
        assert body["next_url"].startswith("/next/items?")
        r = c.get(body["next_url"])


def walk_cursor(c: httpx.Client, params: dict[str, Any], path: str = "/cursor/items") -> list[Page]:
    pages: list[Page] = []
    cursor = None
    while True:
        extra = {"cursor": cursor} if cursor else {}
        body = c.get(path, params={"limit": SIZE, **params, **extra}).raise_for_status().json()
        pages.append(body["data"]["items"])
        cursor = body["meta"]["next"]
        if cursor is None:
            return pages


def walk_link(c: httpx.Client, params: dict[str, Any], path: str = "") -> list[Page]:
    pages, r = [], c.get("/link/items", params={"per_page": SIZE, **params})
    while True:
        pages.append(r.raise_for_status().json())
        if "next" not in r.links:
            return pages
        assert r.links["last"]["url"].startswith("http://")
        r = c.get(r.links["next"]["url"])


def walk_offset(c: httpx.Client, params: dict[str, Any], path: str = "") -> list[Page]:
    pages: list[Page] = []
    offset = 0
    while True:
        q = {"limit": SIZE, "offset": offset, **params}
        body = c.get("/offset/items", params=q).raise_for_status().json()
        pages.append(body["results"])
        offset += len(body["results"])
        if offset >= body["count"]:
            return pages


def walk_page(c: httpx.Client, params: dict[str, Any], path: str = "") -> list[Page]:
    pages: list[Page] = []
    page = 1
    while True:
        q = {"size": SIZE, "page": page, **params}
        items = c.get("/page/items", params=q).raise_for_status().json()["items"]
        if not items:
            return pages
        pages.append(items)
        page += 1


WALKERS: dict[str, Callable[..., list[Page]]] = {
    "datasette": walk_datasette,
    "next": walk_next,
    "cursor": walk_cursor,
    "link": walk_link,
    "offset": walk_offset,
    "page": walk_page,
}


def ids(pages: list[Page]) -> list[int]:
    return [item["id"] for page in pages for item in page]


def keys(items: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(item["updated_at"], item["id"]) for item in items]


# --------------------------------------------------------------------------- data set


def test_make_items_is_deterministic_sorted_and_grouped() -> None:
    items = make_items(30)
    assert items == make_items(30)
    assert items != make_items(30, seed=1)
    assert [i["id"] for i in items] == list(range(1, 31))
    assert keys(items) == sorted(keys(items))
    stamps = [i["updated_at"] for i in items]
    assert all(stamps[k] == stamps[k + 1] == stamps[k + 2] for k in range(0, 30, 3))
    assert len(set(stamps)) == 10
    first = items[0]
    assert set(first) == {
        "id",
        "name",
        "category",
        "price",
        "customer_id",
        "tags",
        "attrs",
        "updated_at",
    }
    assert [i["category"] for i in items[:5]] == ["books", "games", "music", "tools", "books"]
    assert all(1 <= i["customer_id"] <= 50 and 1 <= len(i["tags"]) <= 3 for i in items)
    assert all(round(i["price"], 2) == i["price"] for i in items)


def test_make_items_spans_about_thirty_days() -> None:
    items = make_items(5000)
    assert items[0]["updated_at"] == "2024-01-01T00:00:00Z"
    assert "2024-01-30T00:00:00Z" < items[-1]["updated_at"] < "2024-01-31T23:59:59Z"
    assert timestamp_step(10_000_000) == 1


def test_token_round_trip() -> None:
    token = encode_token("2024-01-02T03:04:05Z", 42)
    assert "=" not in token
    assert decode_token(token) == ("2024-01-02T03:04:05Z", 42)


# --------------------------------------------------------------------------- pagination


@pytest.mark.parametrize("style", WALKERS)
def test_each_style_walks_all_items_once_in_order(
    style: str, api: DemoAPI, client: httpx.Client
) -> None:
    pages = WALKERS[style](client, {})
    assert ids(pages) == [i["id"] for i in api.items]
    assert all(len(p) == SIZE for p in pages[:-1])
    straddles = [a[-1]["updated_at"] == b[0]["updated_at"] for a, b in pairwise(pages)]
    assert any(straddles), "some page boundary must split a group of equal updated_at"


FILTERS: dict[str, Callable[[list[dict[str, Any]]], dict[str, str]]] = {
    "gte": lambda items: {"updated_at__gte": items[49]["updated_at"]},
    "lt": lambda items: {"updated_at__lt": items[150]["updated_at"]},
    "range": lambda items: {
        "updated_at__gte": items[49]["updated_at"],
        "updated_at__lt": items[150]["updated_at"],
    },
    "category": lambda items: {"category": "music"},
    "all": lambda items: {
        "category": "games",
        "updated_at__gte": items[49]["updated_at"],
        "updated_at__lt": items[150]["updated_at"],
    },
    "nothing": lambda items: {"updated_at__gte": "2030-01-01T00:00:00Z"},
}


def expected(items: list[dict[str, Any]], params: dict[str, str]) -> list[int]:
    gte = params.get("updated_at__gte", "")
    lt = params.get("updated_at__lt", "9999")
    category = params.get("category")
    return [
        i["id"] for i in items if gte <= i["updated_at"] < lt and category in (None, i["category"])
    ]


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("style", WALKERS)
def test_filters(style: str, name: str, api: DemoAPI, client: httpx.Client) -> None:
    items = api.items
    params = FILTERS[name](items)
    assert ids(WALKERS[style](client, params)) == expected(items, params)


def test_filter_bounds_are_inclusive_then_exclusive(api: DemoAPI, client: httpx.Client) -> None:
    items = api.items
    params = FILTERS["range"](items)
    got = ids(walk_cursor(client, params))
    # items[48..50] (ids 49-51) share the gte stamp, items[150..152] share the lt stamp
    assert items[48]["updated_at"] == items[49]["updated_at"] != items[47]["updated_at"]
    assert got[0] == items[48]["id"] and got[-1] == items[149]["id"]


def test_filters_accept_other_iso_forms(client: httpx.Client) -> None:
    a = client.get("/offset/items", params={"updated_at__gte": "2024-01-15T00:00:00Z"}).json()
    b = client.get("/offset/items", params={"updated_at__gte": "2024-01-15"}).json()
    c = client.get("/offset/items", params={"updated_at__gte": "2024-01-15T01:00:00+01:00"})
    raw_plus = client.get("/offset/items?updated_at__gte=2024-01-15T01:00:00+01:00")
    assert a == b == c.json() == raw_plus.json()
    assert 0 < a["count"] < N_ITEMS


@pytest.mark.parametrize(
    ("path", "category"),
    [("/categories/tools/items", "tools"), ("/categories/books/items", "books")],
)
def test_category_endpoint(path: str, category: str, api: DemoAPI, client: httpx.Client) -> None:
    items = api.items
    assert ids(walk_cursor(client, {}, path)) == expected(items, {"category": category})
    params = FILTERS["range"](items)
    assert ids(walk_cursor(client, params, path)) == expected(
        items, {**params, "category": category}
    )
    assert ids(walk_cursor(client, {"category": "games"}, path)) == []


def test_customers_and_their_items(api: DemoAPI, client: httpx.Client) -> None:
    customers = [c for page in walk_cursor(client, {}, "/customers") for c in page]
    assert [c["id"] for c in customers] == list(range(1, 51))
    assert all(c["name"] for c in customers)
    items = api.items
    for customer in (1, 17, 50):
        want = [i["id"] for i in items if i["customer_id"] == customer]
        assert ids(walk_cursor(client, {}, f"/customers/{customer}/items")) == want
    r = client.get("/customers/51/items")
    assert r.status_code == 404 and "error" in r.json()


def test_link_header_shape(api: DemoAPI, client: httpx.Client) -> None:
    r = client.get("/link/items", params={"per_page": 50, "page": 2})
    last = (N_ITEMS + 49) // 50
    assert r.links["next"]["url"] == f"{api.url}/link/items?per_page=50&page=3"
    assert r.links["last"]["url"] == f"{api.url}/link/items?per_page=50&page={last}"
    assert 'rel="next"' in r.headers["link"] and 'rel="last"' in r.headers["link"]
    final = client.get("/link/items", params={"per_page": 50, "page": last})
    assert "link" not in final.headers
    assert client.get("/link/items", params={"per_page": 50, "page": 99}).json() == []


def test_offset_count_and_page_past_end(client: httpx.Client) -> None:
    body = client.get("/offset/items", params={"limit": 5, "offset": 198}).json()
    assert body["count"] == N_ITEMS and len(body["results"]) == 2
    assert client.get("/page/items", params={"page": 999}).json() == {"items": []}


def test_defaults_and_ignored_datasette_params(client: httpx.Client) -> None:
    params = {"_shape": "objects", "_sort": "id", "_nocount": "1", "_nofacet": "1"}
    body = client.get("/db/items.json", params=params).json()
    assert len(body["rows"]) == 100
    assert "_nocount=1" in body["next_url"]
    assert len(client.get("/cursor/items").json()["data"]["items"]) == 100


def test_page_size_is_capped(big: DemoAPI) -> None:
    with make_client(big.url) as c:
        assert len(c.get("/cursor/items", params={"limit": 10_000}).json()["data"]["items"]) == 5000
        assert len(c.get("/db/items.json", params={"_size": "max"}).json()["rows"]) == 5000
        assert len(c.get("/link/items", params={"per_page": 99_999}).json()) == 5000


@pytest.mark.parametrize(
    "query",
    [
        "/cursor/items?limit=abc",
        "/cursor/items?limit=0",
        "/cursor/items?cursor=%%%",
        "/db/items.json?_next=not-a-token",
        "/offset/items?offset=-1",
        "/page/items?page=0",
        "/cursor/items?updated_at__gte=yesterday",
    ],
)
def test_bad_params_are_400(query: str, client: httpx.Client) -> None:
    r = client.get(query)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/customers/abc/items", 404),
        ("GET", "/categories/food/items", 404),
        ("GET", "/cursor/items/", 404),
        ("POST", "/cursor/items", 405),
        ("DELETE", "/_control/nope", 404),
    ],
)
def test_unknown_paths(method: str, path: str, status: int, client: httpx.Client) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    assert r.json()["status"] == status


def test_keep_alive_and_content_length(api: DemoAPI) -> None:
    request = f"GET /cursor/items?limit=2 HTTP/1.1\r\nHost: {api.netloc}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request)
            assert reader.readline().startswith(b"HTTP/1.1 200")
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert "connection" not in headers
            body = reader.read(int(headers["content-length"]))
            assert len(json.loads(body)["data"]["items"]) == 2


def test_stop_cuts_connections_and_restart_keeps_the_port() -> None:
    api = DemoAPI(items=10).start()
    url = api.url
    with make_client(url) as c:
        assert c.get("/cursor/items").status_code == 200
        api.stop()
        with pytest.raises(httpx.TransportError):
            c.get("/cursor/items")
        api.start()
        try:
            assert api.url == url
            assert c.get("/cursor/items").status_code == 200
        finally:
            api.stop()


# --------------------------------------------------------------------------- faults


def test_status_fault_with_retry_after(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="status", status=429, retry_after="3", path="/cursor/")
    assert client.get("/next/items").status_code == 200  # path does not match
    r = client.get("/cursor/items")
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["status"] == 429
    assert client.get("/cursor/items").status_code == 200  # times defaults to 1
    assert [e["fault"] for e in api.requests] == [None, "status", None]


def test_retry_after_http_date_is_verbatim(api: DemoAPI, client: httpx.Client) -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    api.add_fault(kind="status", status=503, retry_after=date)
    assert client.get("/page/items").headers["retry-after"] == date


def test_after_and_times(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="status", status=500, after=1, times=2)
    assert [client.get("/cursor/items").status_code for _ in range(4)] == [200, 500, 500, 200]


def test_times_forever_and_first_matching_rule_wins(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="status", status=502, path="/offset/", times=-1)
    api.add_fault(kind="status", status=504)
    assert client.get("/page/items").status_code == 504
    assert [client.get("/offset/items").status_code for _ in range(3)] == [502] * 3
    assert client.get("/page/items").status_code == 200


def test_reset(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.get("/cursor/items")
    assert client.get("/cursor/items").status_code == 200
    assert api.requests[0]["fault"] == "reset"


def test_reset_is_a_real_rst(api: DemoAPI) -> None:
    api.add_fault(kind="reset")
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(b"GET /cursor/items HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)


def test_slow_causes_read_timeout(api: DemoAPI) -> None:
    api.add_fault(kind="slow", delay=0.5)
    with make_client(api.url, timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
        c.get("/cursor/items")


def test_slow_adds_latency_then_answers(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="slow", delay=0.05, times=-1)
    start = time.perf_counter()
    for _ in range(2):
        assert client.get("/cursor/items", params={"limit": 1}).status_code == 200
    assert time.perf_counter() - start >= 0.1


def test_truncate(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="truncate")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get("/cursor/items")
    api.add_fault(kind="truncate")
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(b"GET /cursor/items HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert 0 < len(body) < length


def test_malformed(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="malformed")
    r = client.get("/cursor/items")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_html(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="html")
    r = client.get("/cursor/items")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>")


def test_empty(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="empty")
    r = client.get("/cursor/items")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"


def test_missing_records(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="missing_records")
    assert client.get("/cursor/items").json() == {"unexpected": True}


def test_repeat_token_cursor(api: DemoAPI, client: httpx.Client) -> None:
    first = client.get("/cursor/items", params={"limit": 5}).json()
    api.add_fault(kind="repeat_token", times=-1)
    q = {"limit": 5, "cursor": first["meta"]["next"]}
    second = client.get("/cursor/items", params=q).json()
    assert second["meta"]["next"] == first["meta"]["next"]
    assert client.get("/cursor/items", params=q).json() == second
    api.clear_faults()
    api.add_fault(kind="repeat_token")  # on a first page: the token leads back to it
    looped = client.get("/cursor/items", params={"limit": 5}).json()
    again = client.get("/cursor/items", params={"limit": 5, "cursor": looped["meta"]["next"]})
    assert again.json()["data"] == first["data"]


def test_repeat_token_next_url_datasette_and_link(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="repeat_token", times=-1)
    first = client.get("/next/items", params={"limit": 5}).json()
    assert client.get(first["next_url"]).json() == first
    first = client.get("/db/items.json", params={"_size": 5}).json()
    assert client.get(first["next_url"]).json() == first
    r = client.get("/link/items", params={"per_page": 5, "page": 3})
    assert r.links["next"]["url"].endswith("page=3")
    assert client.get(r.links["next"]["url"]).json() == r.json()


def test_redirect_loop(api: DemoAPI, client: httpx.Client) -> None:
    api.add_fault(kind="redirect_loop")
    r = client.get("/cursor/items?limit=3")
    assert r.status_code == 302 and r.headers["location"] == "/cursor/items?limit=3"
    api.add_fault(kind="redirect_loop", times=-1)
    with pytest.raises(httpx.TooManyRedirects):
        client.get("/cursor/items", follow_redirects=True)


def test_redirect(api: DemoAPI, client: httpx.Client) -> None:
    target = f"{api.url}/page/items?size=2"
    api.add_fault(kind="redirect", location=target)
    r = client.get("/cursor/items", follow_redirects=True)
    assert r.history[0].status_code == 302 and r.history[0].headers["location"] == target
    assert len(r.json()["items"]) == 2


def test_foreign_next(api: DemoAPI, client: httpx.Client) -> None:
    host = f"http://127.0.0.2:{api.port}"
    api.add_fault(kind="foreign_next", host=host, times=-1)
    body = client.get("/db/items.json", params={"_size": 5}).json()
    assert body["next_url"].startswith(f"{host}/db/items.json?")
    assert body["next"] in body["next_url"]
    assert client.get("/next/items").json()["next_url"].startswith(f"{host}/next/items?")
    links = client.get("/link/items").links
    assert links["next"]["url"].startswith(f"{host}/link/items?")
    assert client.get("/cursor/items").json()["meta"]["next"]  # no URL to move: unchanged


def test_request_log(api: DemoAPI, client: httpx.Client) -> None:
    client.get("/cursor/items", params={"limit": "3"}, headers={"X-Trace": "abc"})
    client.get("/_control/requests")
    (entry,) = api.requests
    assert entry["method"] == "GET" and entry["path"] == "/cursor/items"
    assert entry["query"] == {"limit": "3"}
    assert entry["headers"]["x-trace"] == "abc" and entry["fault"] is None
    api.clear_requests()
    assert api.requests == []


@pytest.mark.parametrize(
    "rule",
    [
        {"kind": "nope"},
        {"kind": "status", "status": "500"},
        {"kind": "status", "times": 0},
        {"kind": "status", "after": -1},
        {"kind": "redirect"},
        {"kind": "foreign_next"},
        {"kind": "slow", "dealy": 1},
    ],
)
def test_invalid_fault_rules(rule: dict[str, Any], api: DemoAPI) -> None:
    with pytest.raises(ValueError):
        api.add_fault(**rule)
    assert api.faults == []


# --------------------------------------------------------------------------- auth


@pytest.fixture
def secured() -> Iterator[DemoAPI]:
    with DemoAPI(items=20, token="s3cret") as api:
        yield api


def test_auth(secured: DemoAPI) -> None:
    with make_client(secured.url) as c:
        r = c.get("/cursor/items")
        assert r.status_code == 401 and r.json()["status"] == 401
        bad = {"Authorization": "Bearer wrong"}
        assert c.get("/cursor/items", headers=bad).status_code == 401
        assert c.get("/nope").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/cursor/items", headers=good).status_code == 200
        r = c.get("/db/items.json", params={"api_key": "s3cret", "_size": 5})
        assert r.status_code == 200 and "api_key" not in r.json()["next_url"]
        r = c.get("/next/items", params={"api_key": "s3cret", "limit": 5})
        assert "api_key" not in r.json()["next_url"]
        r = c.get("/link/items", params={"api_key": "s3cret", "per_page": 5})
        assert "api_key" not in r.headers["link"]
        assert c.get("/_control/requests").status_code == 200
        assert [e["fault"] for e in secured.requests] == [None] * 7


# --------------------------------------------------------------------------- control


@pytest.fixture
def own() -> Iterator[DemoAPI]:
    """A private server for tests that change the data."""
    with DemoAPI(items=30) as api:
        yield api


def test_control_faults_over_http(api: DemoAPI, client: httpx.Client) -> None:
    r = client.post("/_control/faults", json={"kind": "status", "status": 429, "times": -1})
    assert r.status_code == 200
    rules = [{"kind": "empty", "path": "/page/"}, {"kind": "html", "path": "/offset/"}]
    assert client.post("/_control/faults", json=rules).json()["faults"] == 3
    assert [f["kind"] for f in client.get("/_control/faults").json()] == ["status", "empty", "html"]
    assert client.get("/cursor/items").status_code == 429
    assert client.get("/_control/requests").status_code == 200  # never faulted
    bad = client.post("/_control/faults", json=[{"kind": "empty"}, {"kind": "bogus"}])
    assert bad.status_code == 400 and "bogus" in bad.json()["error"]
    assert client.post("/_control/faults", content=b"{not json").status_code == 400
    assert len(api.faults) == 3
    assert client.delete("/_control/faults").status_code == 200
    assert api.faults == []
    assert client.get("/cursor/items").status_code == 200


def test_control_requests_over_http(api: DemoAPI, client: httpx.Client) -> None:
    client.get("/page/items", params={"page": "2"})
    log = client.get("/_control/requests").json()
    assert [(e["path"], e["query"]) for e in log] == [("/page/items", {"page": "2"})]
    assert client.delete("/_control/requests").status_code == 200
    assert client.get("/_control/requests").json() == []


def test_control_items_over_http(own: DemoAPI) -> None:
    with make_client(own.url) as c:
        r = c.post("/_control/items", json={"add": 4})
        assert r.json() == {"ok": True, "added": [31, 32, 33, 34], "count": 34}
        assert c.post("/_control/items", json={"touch": [1]}).status_code == 200
        items = c.get("/_control/items").json()
        assert [i["id"] for i in items][-5:] == [31, 32, 33, 34, 1]
        assert c.post("/_control/items", json={"touch": [999]}).status_code == 400
        assert c.post("/_control/items", json={"remove": 1}).status_code == 400
        assert own.requests == []


def test_add_items_continue_a_keyset_walk(own: DemoAPI) -> None:
    with make_client(own.url) as c:
        before = own.items
        last = before[-1]
        token = encode_token(last["updated_at"], last["id"])
        assert c.get("/cursor/items", params={"cursor": token}).json()["data"]["items"] == []
        new = own.add_items(5)
        assert [i["id"] for i in new] == [31, 32, 33, 34, 35]
        assert all(i["updated_at"] > last["updated_at"] for i in new)
        got = c.get("/cursor/items", params={"cursor": token}).json()["data"]["items"]
        assert got == new
        assert own.items == before + new


def test_touch_items_moves_them_last(own: DemoAPI) -> None:
    with make_client(own.url) as c:
        newest = own.items[-1]["updated_at"]
        own.touch_items([2, 5])
        items = own.items
        assert [i["id"] for i in items[-2:]] == [2, 5]
        assert items[-1]["updated_at"] == items[-2]["updated_at"] > newest
        assert keys(items) == sorted(keys(items))
        q = {"updated_at__gte": items[-1]["updated_at"]}
        assert ids(walk_next(c, q)) == [2, 5]
        assert ids(walk_link(c, {})) == [i["id"] for i in items]
        assert ids(walk_cursor(c, {}, "/categories/games/items")) == [
            i["id"] for i in items if i["category"] == "games"
        ]
    with pytest.raises(ValueError):
        own.touch_items([999])


# --------------------------------------------------------------------------- CLI


def read_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """One stdout line, without hanging the suite if the child never prints."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("the demo API did not print its URL")
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_url_serves_and_exits_cleanly(sig: signal.Signals) -> None:
    args = ["--port", "0", "--items", "40", "--token", "t0k"]
    cmd = [sys.executable, "-m", "pagesync.demo.api", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = read_line(proc)
            prefix = "pagesync demo API listening on http://127.0.0.1:"
            assert line.startswith(prefix) and line.endswith("\n")
            url = line.strip().rsplit(" ", 1)[1]
            with make_client(url) as c:
                r = c.get("/cursor/items", params={"api_key": "t0k", "limit": 100})
                assert [i["id"] for i in r.json()["data"]["items"]] == list(range(1, 41))
                assert c.get("/cursor/items").status_code == 401
            proc.send_signal(sig)
            assert proc.wait(timeout=10) == 0
            assert proc.stdout is not None and proc.stdout.read() == ""
        finally:
            proc.kill()


def test_main_reports_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--port", str(busy.getsockname()[1]), "--items", "3"]) == 2
    assert "cannot listen" in capsys.readouterr().err


def test_categories_constant() -> None:
    assert CATEGORIES == ("books", "games", "music", "tools")
