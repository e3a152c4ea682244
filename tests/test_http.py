"""SourceClient against the real demo API on loopback: retries, Retry-After, timeouts,
failures that name their URL without secrets, and credentials kept to the source's origin.

Backoff sleeps go through an injected `sleep` that records the delays, so the retry policy
is checked exactly and the tests never wait for it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from conftest import cleaned

from pagesync.core import config as cfg
from pagesync.core import http as http_mod
from pagesync.core.errors import HTTPError
from pagesync.core.http import RateLimiter, SourceClient, redact_url, retry_after
from pagesync.core.paginators import PageRequest
from pagesync.demo.api import DemoAPI

PAGE = PageRequest("/cursor/items", {"limit": 5})
HEADERS = {"Authorization": "Bearer s3cret-token", "X-Tenant": "acme"}


def source(base_url: str, **kw: Any) -> cfg.Source:
    retry = {"attempts": 3, "backoff": 0.01, "max_backoff": 1000, **kw.pop("retry", {})}
    return cfg.Source(base_url=base_url, headers=HEADERS, timeout=5, retry=retry, **kw)


@contextmanager
def opened(spec: cfg.Source, **kw: Any) -> Iterator[SourceClient]:
    c = SourceClient(spec, **kw)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def server() -> Iterator[DemoAPI]:
    with DemoAPI(items=200) as running:
        yield running


@pytest.fixture
def api(server: DemoAPI) -> Iterator[DemoAPI]:
    """One real demo API for the module, with no faults and an empty log for each test."""
    yield from cleaned(server)


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture
def client(api: DemoAPI, delays: list[float]) -> Iterator[SourceClient]:
    c = SourceClient(source(api.url), sleep=delays.append)
    yield c
    c.close()


def ok_page(response: httpx.Response) -> None:
    assert response.status_code == 200
    assert len(response.json()["data"]["items"]) == 5


# -- 429 and Retry-After --------------------------------------------------------------------


def test_429_retry_after_seconds_is_honoured(
    api: DemoAPI, client: SourceClient, delays: list[float]
) -> None:
    api.add_fault(kind="status", status=429, retry_after="7", path="/cursor/items")
    ok_page(client.get(PAGE))
    assert delays == [7.0]
    assert [r["fault"] for r in api.requests] == ["status", None]


def test_429_retry_after_http_date_is_honoured(
    api: DemoAPI, client: SourceClient, delays: list[float]
) -> None:
    when = formatdate(time.time() + 120, usegmt=True)
    api.add_fault(kind="status", status=429, retry_after=when)
    ok_page(client.get(PAGE))
    assert len(delays) == 1
    # An HTTP date has whole seconds; the request took well under ten.
    assert 110 <= delays[0] <= 120


def test_retry_after_is_capped_by_max_backoff(api: DemoAPI, delays: list[float]) -> None:
    api.add_fault(kind="status", status=429, retry_after="3600", times=2)
    with opened(source(api.url, retry={"max_backoff": 2.5}), sleep=delays.append) as c:
        ok_page(c.get(PAGE))
    assert delays == [2.5, 2.5]


def test_503_with_retry_after_uses_it(
    api: DemoAPI, client: SourceClient, delays: list[float]
) -> None:
    api.add_fault(kind="status", status=503, retry_after="4")
    ok_page(client.get(PAGE))
    assert delays == [4.0]


# -- 5xx: retried with capped exponential backoff ---------------------------------------------


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_5xx_retried_then_succeeds(
    api: DemoAPI, client: SourceClient, delays: list[float], status: int
) -> None:
    api.add_fault(kind="status", status=status, times=2)
    ok_page(client.get(PAGE))
    assert [r["fault"] for r in api.requests] == ["status", "status", None]
    assert len(delays) == 2


def test_backoff_doubles_with_jitter_and_is_capped(api: DemoAPI, delays: list[float]) -> None:
    api.add_fault(kind="status", status=500, times=4)
    spec = source(api.url, retry={"attempts": 5, "backoff": 0.1, "max_backoff": 0.3})
    with opened(spec, sleep=delays.append) as c:
        ok_page(c.get(PAGE))
    caps = [0.1, 0.2, 0.3, 0.3]  # backoff * 2**attempt, capped at max_backoff
    assert len(delays) == 4
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap  # equal jitter: never zero, never above the cap


def test_exhausted_retries_name_status_and_url(api: DemoAPI, client: SourceClient) -> None:
    api.add_fault(kind="status", status=503, times=-1)
    with pytest.raises(HTTPError) as info:
        client.get(PageRequest("/cursor/items", {"limit": 5, "api_key": "hunter2"}))
    err = info.value
    assert err.transient is True
    assert "HTTP 503" in str(err)
    assert "after 3 tries" in str(err)
    assert "injected fault" in str(err)  # the body's first words
    assert err.url == f"{api.url}/cursor/items?limit=5&api_key=***"
    assert err.url in str(err)
    assert "hunter2" not in str(err)
    assert len(api.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_not_retried(
    api: DemoAPI, client: SourceClient, delays: list[float], status: int
) -> None:
    api.add_fault(kind="status", status=status, times=-1)
    with pytest.raises(HTTPError) as info:
        client.get(PAGE)
    assert info.value.transient is False
    assert f"HTTP {status}" in str(info.value)
    assert "tries" not in str(info.value)
    assert len(api.requests) == 1
    assert delays == []


def test_real_404_not_retried(api: DemoAPI, client: SourceClient) -> None:
    with pytest.raises(HTTPError) as info:
        client.get(PageRequest("/no/such/endpoint"))
    assert info.value.transient is False
    assert "HTTP 404" in str(info.value)
    assert info.value.url == f"{api.url}/no/such/endpoint"
    assert len(api.requests) == 1


# -- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_reset_and_truncated_body_retried(
    api: DemoAPI, client: SourceClient, delays: list[float], kind: str
) -> None:
    api.add_fault(kind=kind, path="/cursor/items")
    ok_page(client.get(PAGE))
    assert [r["fault"] for r in api.requests] == [kind, None]
    assert len(delays) == 1


def test_truncated_body_every_time_fails_transient(api: DemoAPI, client: SourceClient) -> None:
    api.add_fault(kind="truncate", times=-1)
    with pytest.raises(HTTPError) as info:
        client.get(PAGE)
    assert info.value.transient is True
    assert "after 3 tries" in str(info.value)
    assert len(api.requests) == 3


def test_read_timeout_retried(api: DemoAPI, delays: list[float]) -> None:
    api.add_fault(kind="slow", delay=0.5)
    spec = cfg.Source(
        base_url=api.url, timeout=0.1, retry={"attempts": 3, "backoff": 0.01, "max_backoff": 0.01}
    )
    with opened(spec, sleep=delays.append) as c:
        ok_page(c.get(PAGE))
    assert [r["fault"] for r in api.requests] == ["slow", None]
    assert len(delays) == 1


def test_read_timeout_every_time_names_the_timeout(api: DemoAPI, delays: list[float]) -> None:
    api.add_fault(kind="slow", delay=0.5, times=2)
    spec = cfg.Source(
        base_url=api.url, timeout=0.1, retry={"attempts": 2, "backoff": 0.01, "max_backoff": 0.01}
    )
    with opened(spec, sleep=delays.append) as c, pytest.raises(HTTPError) as info:
        c.get(PAGE)
    assert "ReadTimeout" in str(info.value)
    assert "after 2 tries" in str(info.value)
    assert info.value.transient is True


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_after_all_attempts(delays: list[float]) -> None:
    port = closed_port()
    spec = source(f"http://127.0.0.1:{port}")
    with opened(spec, sleep=delays.append) as c, pytest.raises(HTTPError) as info:
        c.get(PageRequest("/items", {"token": "abc", "page": 2}))
    err = info.value
    assert err.transient is True
    assert "ConnectError" in str(err)
    assert "after 3 tries" in str(err)
    assert err.url == f"http://127.0.0.1:{port}/items?token=***&page=2"
    assert len(delays) == 2


def test_redirect_loop_is_not_retried(
    api: DemoAPI, client: SourceClient, delays: list[float]
) -> None:
    api.add_fault(kind="redirect_loop", times=-1)
    with pytest.raises(HTTPError) as info:
        client.get(PAGE)
    assert info.value.transient is False
    assert "redirect" in str(info.value)
    assert delays == []


def test_redirect_followed(api: DemoAPI, client: SourceClient) -> None:
    api.add_fault(kind="redirect", location="/cursor/items?limit=5", path="/old/items")
    ok_page(client.get(PageRequest("/old/items")))
    assert [r["path"] for r in api.requests] == ["/old/items", "/cursor/items"]


# -- credentials stay on the source's origin ------------------------------------------------


@pytest.fixture
def foreign() -> Iterator[DemoAPI]:
    """Another origin on loopback (127.0.0.2 is loopback on Linux)."""
    with DemoAPI(items=20, host="127.0.0.2") as other:
        yield other


def test_source_headers_sent_to_own_origin(api: DemoAPI, client: SourceClient) -> None:
    ok_page(client.get(PAGE))
    ok_page(client.get(PageRequest(f"{api.url}/cursor/items?limit=5")))  # absolute, same origin
    for request in api.requests:
        assert request["headers"]["authorization"] == "Bearer s3cret-token"
        assert request["headers"]["x-tenant"] == "acme"


def test_foreign_next_refused_with_credentials(
    api: DemoAPI, foreign: DemoAPI, client: SourceClient
) -> None:
    url = f"{foreign.url}/cursor/items?limit=5&api_key=leaked"
    with pytest.raises(HTTPError) as info:
        client.get(PageRequest(url))
    err = info.value
    assert err.transient is False
    assert "follow_foreign_next" in str(err)
    assert "127.0.0.2" in str(err)
    assert "leaked" not in str(err)
    assert foreign.requests == []


def test_foreign_next_followed_without_credentials(
    api: DemoAPI, foreign: DemoAPI, delays: list[float]
) -> None:
    spec = source(api.url, follow_foreign_next=True)
    with opened(spec, sleep=delays.append, auth=httpx.BasicAuth("u", "pw")) as c:
        ok_page(c.get(PageRequest(f"{foreign.url}/cursor/items?limit=5")))
        ok_page(c.get(PAGE))
    (request,) = foreign.requests
    assert "authorization" not in request["headers"]
    assert "x-tenant" not in request["headers"]
    (own,) = api.requests
    assert own["headers"]["x-tenant"] == "acme"
    assert own["headers"]["authorization"].startswith("Basic ")  # auth= wins on its origin


def test_foreign_next_is_retried_too(api: DemoAPI, foreign: DemoAPI, delays: list[float]) -> None:
    foreign.add_fault(kind="status", status=502)
    with opened(source(api.url, follow_foreign_next=True), sleep=delays.append) as c:
        ok_page(c.get(PageRequest(f"{foreign.url}/cursor/items?limit=5")))
    assert [r["fault"] for r in foreign.requests] == ["status", None]
    assert len(delays) == 1


# -- the rate limiter is applied per attempt ---------------------------------------------------


def test_limiter_waits_before_every_attempt(api: DemoAPI, delays: list[float]) -> None:
    class Counting(RateLimiter):
        calls = 0

        def wait(self) -> None:
            Counting.calls += 1

    api.add_fault(kind="status", status=500, times=2)
    with opened(source(api.url), limiter=Counting(1000), sleep=delays.append) as c:
        ok_page(c.get(PAGE))
    assert Counting.calls == 3


# -- redact_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://user:pa55@api.example.com:8443/v1/items?page=2&api_key=abc&limit=10",
            "https://api.example.com:8443/v1/items?page=2&api_key=***&limit=10",
        ),
        (
            "http://api.example.com/x?token=t1&access_token=t2&client_secret=t3&q=ok",
            "http://api.example.com/x?token=***&access_token=***&client_secret=***&q=ok",
        ),
        (
            "http://api.example.com/x?API_KEY=abc&Password=pw&signature=s&cursor=c2",
            "http://api.example.com/x?API_KEY=***&Password=***&signature=***&cursor=c2",
        ),
        ("http://api.example.com/x?empty=&token=", "http://api.example.com/x?empty=&token=***"),
        ("http://api.example.com/plain", "http://api.example.com/plain"),
        ("http://u@api.example.com/x#frag", "http://api.example.com/x"),
        (
            "http://api.example.com/x?after=2024-01-01T00:00:00Z",
            "http://api.example.com/x?after=2024-01-01T00:00:00Z",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_url(httpx.URL(url)) == redact_url(url)


def test_redact_url_keeps_ipv6_brackets() -> None:
    assert redact_url("http://user:pw@[::1]:8080/x?key=k") == "http://[::1]:8080/x?key=***"


# -- retry_after -------------------------------------------------------------------------------


def _with_retry_after(value: str | None) -> httpx.Response:
    headers = {} if value is None else {"Retry-After": value}
    return httpx.Response(429, headers=headers, request=httpx.Request("GET", "http://x/"))


def test_retry_after_parsing() -> None:
    assert retry_after(_with_retry_after(None)) is None
    assert retry_after(_with_retry_after("")) is None
    assert retry_after(_with_retry_after("120")) == 120.0
    assert retry_after(_with_retry_after(" 0 ")) == 0.0
    assert retry_after(_with_retry_after("soon")) is None
    assert retry_after(_with_retry_after("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # past
    ahead = retry_after(_with_retry_after(formatdate(time.time() + 60, usegmt=True)))
    assert ahead is not None and 50 <= ahead <= 60


# -- RateLimiter, on a fake clock ---------------------------------------------------------------


class FakeTime:
    """Stands in for the `time` module inside pagesync.core.http: a clock that only sleep moves."""

    def __init__(self, now: float = 1000.0, *, advance: bool = True) -> None:
        self.now = now
        self.advance = advance
        self.sleeps: list[float] = []
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(round(seconds, 9))
            if self.advance:
                self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(http_mod, "time", fake)
    return fake


def test_rate_limiter_spaces_back_to_back_calls(clock: FakeTime) -> None:
    limiter = RateLimiter(per_second=4)
    for _ in range(5):
        limiter.wait()
    assert clock.sleeps == [0.25, 0.25, 0.25, 0.25]
    assert clock.now == pytest.approx(1001.0)


def test_rate_limiter_does_not_wait_after_idle(clock: FakeTime) -> None:
    limiter = RateLimiter(per_second=2)
    limiter.wait()
    clock.now += 10  # idle far longer than the interval
    limiter.wait()
    assert clock.sleeps == []
    clock.now += 0.2  # 0.2 s after the last call: 0.3 s of the 0.5 s interval remain
    limiter.wait()
    assert clock.sleeps == [pytest.approx(0.3)]


def test_rate_limiter_gives_concurrent_callers_distinct_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTime(advance=False)  # every thread arrives at the same instant
    monkeypatch.setattr(http_mod, "time", fake)
    limiter = RateLimiter(per_second=10)
    threads = [threading.Thread(target=limiter.wait) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One goes at once, the others are queued 0.1 s apart: slots never collide.
    assert sorted(fake.sleeps) == pytest.approx([0.1 * i for i in range(1, 8)])


def test_a_page_response_is_freed_without_the_garbage_collector(
    api: DemoAPI, client: SourceClient
) -> None:
    """httpx links a response and its stream both ways; pages drop that link, so a page's
    body goes as soon as the page is done with it, not at the collector's next pass."""
    import gc
    import weakref

    gc.disable()
    try:
        response = client.get(PAGE)
        ok_page(response)
        assert list(response.iter_bytes()) == [response.content]  # the same bytes still
        gone = weakref.ref(response)
        del response
        assert gone() is None
    finally:
        gc.enable()
