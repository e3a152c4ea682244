"""The bundled demo HTTP API: what `pagesync demo` syncs, the loopback server behind the
integration tests (with switchable faults) and the benchmark target.

It must be fast, so every record is serialized once with orjson, pages are built by joining
bytes, and filters and keyset cursors seek with bisect on the sorted (updated_at, id) keys.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

__all__ = [
    "CATEGORIES",
    "FAULT_KINDS",
    "MAX_PAGE_SIZE",
    "DemoAPI",
    "decode_token",
    "encode_token",
    "main",
    "make_customers",
    "make_items",
    "timestamp_step",
]

Item = dict[str, Any]

CATEGORIES = ("books", "games", "music", "tools")
CUSTOMER_COUNT = 50
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 5000
START_EPOCH = 1704067200  # 2024-01-01T00:00:00Z
SPAN_SECONDS = 30 * 86400
GROUP_SIZE = 3  # items sharing one updated_at, so equal cursor values straddle pages
CONTROL_PREFIX = "/_control/"
MAX_BODY = 10 * 1024 * 1024
ZERO_TOKEN_KEY = ("1970-01-01T00:00:00Z", 0)  # sorts before every record: "the first page"
OFFSET_CAP = 1000  # /capped/items refuses offsets above it, as many search APIs do
POST_ROUTES = frozenset({"/search/items", "/notion/items", "/graphql"})

FAULT_KINDS = frozenset(
    {
        "status",
        "reset",
        "slow",
        "truncate",
        "malformed",
        "html",
        "empty",
        "missing_records",
        "repeat_token",
        "redirect_loop",
        "redirect",
        "foreign_next",
        "graphql_throttled",
        "graphql_error",
    }
)

_ADJECTIVES = ("red", "quiet", "rapid", "golden", "tiny", "bold", "ancient", "clever", "lucky")
_NOUNS = ("falcon", "garden", "engine", "river", "lantern", "puzzle", "anchor", "comet", "harbor")
_TAGS = ("new", "sale", "popular", "gift", "eco", "limited", "classic", "bundle", "import")
_COLORS = ("red", "green", "blue", "black", "white", "yellow")
_SIZES = ("S", "M", "L", "XL")
_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Linus")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is down for maintenance.</p>"
    b"</body></html>\n"
)


# --------------------------------------------------------------------------- data set


def timestamp_step(n: int) -> int:
    """Seconds between timestamp groups, chosen so that n items span about 30 days."""
    groups = max(1, math.ceil(n / GROUP_SIZE))
    return max(1, math.ceil(SPAN_SECONDS / groups))


def iso(epoch: float) -> str:
    """Format like the API does, so string and numeric ordering agree."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _make_item(item_id: int, epoch: int, rng: random.Random) -> Item:
    """One record; the category follows the id so category pages are predictable."""
    return {
        "id": item_id,
        "name": f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {item_id}",
        "category": CATEGORIES[(item_id - 1) % len(CATEGORIES)],
        "price": round(rng.uniform(1.0, 250.0), 2),
        "customer_id": rng.randint(1, CUSTOMER_COUNT),
        "tags": rng.sample(_TAGS, rng.randint(1, 3)),
        "attrs": {"color": rng.choice(_COLORS), "size": rng.choice(_SIZES)},
        "updated_at": iso(epoch),
    }


def _generate(first_id: int, count: int, first_epoch: int, step: int, seed: int) -> list[Item]:
    """Items first_id.. in groups of GROUP_SIZE per timestamp, reproducible from the seed."""
    rng = random.Random(seed * 1_000_003 + first_id)
    return [
        _make_item(first_id + k, first_epoch + (k // GROUP_SIZE) * step, rng) for k in range(count)
    ]


def make_items(n: int, seed: int = 0) -> list[Item]:
    """The deterministic demo data set: ids 1..n sorted by (updated_at, id)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return _generate(1, n, START_EPOCH, timestamp_step(n), seed)


def make_customers(seed: int = 0) -> list[Item]:
    """Customers 1..50, the parents of the per-customer item streams."""
    rng = random.Random(seed * 1_000_003 - 1)
    return [
        {
            "id": i,
            "name": f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
            "email": f"customer{i}@example.com",
        }
        for i in range(1, CUSTOMER_COUNT + 1)
    ]


# --------------------------------------------------------------------------- tokens


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _unb64(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def encode_token(updated_at: str, item_id: int) -> str:
    """Opaque keyset token: urlsafe base64 of the last record's updated_at and id."""
    return _b64(f"{updated_at}|{item_id}")


def decode_token(token: str) -> tuple[str, int]:
    """Inverse of encode_token; raises ValueError for anything it did not make."""
    updated_at, sep, item_id = _unb64(token).rpartition("|")
    if not sep:
        raise ValueError("not a keyset token")
    return updated_at, int(item_id)


def parse_time(value: str) -> float:
    """Epoch seconds from an ISO-8601 string; naive values are UTC, 'Z' works on 3.10."""
    text = value.strip()
    if len(text) > 6 and text[-6] == " " and text[-3] == ":":
        text = f"{text[:-6]}+{text[-5:]}"  # an unencoded "+01:00" arrives as " 01:00"
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


# --------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class _Record:
    epoch: int
    item: Item
    blob: bytes  # orjson of item, serialized once


@dataclass(frozen=True)
class _View:
    """Sorted keys and their pre-serialized records: all a page needs."""

    keys: list[tuple[int, int]]
    blobs: list[bytes]

    @classmethod
    def of(cls, records: Iterable[_Record]) -> _View:
        records = list(records)
        return cls([(r.epoch, r.item["id"]) for r in records], [r.blob for r in records])


_EMPTY_VIEW = _View([], [])


class _Snapshot:
    """Immutable, sorted item set with per-filter views; swapped whole on every change so
    request threads never see a half-updated index."""

    def __init__(self, records: Iterable[_Record]) -> None:
        self.records = sorted(records, key=lambda r: (r.epoch, r.item["id"]))
        self.full = _View.of(self.records)
        self._views: dict[tuple[str | None, int | None], _View] = {(None, None): self.full}
        self._lock = threading.Lock()
        self._bucket()

    def _bucket(self) -> None:
        """Build category and customer views in one pass, so first requests are fast too."""
        groups: dict[tuple[str | None, int | None], list[_Record]] = {}
        for record in self.records:
            groups.setdefault((record.item["category"], None), []).append(record)
            groups.setdefault((None, record.item["customer_id"]), []).append(record)
        for key, records in groups.items():
            self._views[key] = _View.of(records)

    def view(self, category: str | None, customer_id: int | None) -> _View:
        """Records matching both filters; unknown values give an empty view (never cached)."""
        key = (category, customer_id)
        with self._lock:
            found = self._views.get(key)
            if found is not None:
                return found
            if category is not None and category not in CATEGORIES:
                return _EMPTY_VIEW
            if customer_id is not None and not 1 <= customer_id <= CUSTOMER_COUNT:
                return _EMPTY_VIEW
            built = _View.of(
                r
                for r in self.records
                if category in (None, r.item["category"])
                and customer_id in (None, r.item["customer_id"])
            )
            self._views[key] = built
            return built

    def items(self) -> list[Item]:
        """Deep copies via the serialized form: cheap and safe to mutate."""
        return orjson.loads(b"[" + b",".join(self.full.blobs) + b"]")


# --------------------------------------------------------------------------- faults


@dataclass
class _FaultRule:
    kind: str
    path: str | None = None
    after: int = 0
    times: int = 1
    status: int = 500
    retry_after: str | None = None
    delay: float = 1.0
    location: str | None = None
    host: str | None = None
    seen: int = 0
    used: int = 0

    def applies_to(self, path: str) -> bool:
        return self.path is None or self.path in path

    @property
    def exhausted(self) -> bool:
        return self.times != -1 and self.used >= self.times

    @property
    def host_base(self) -> str:
        """foreign_next's host as scheme://netloc; a bare host:port means http."""
        host = (self.host or "").rstrip("/")
        return host if "://" in host else f"http://{host}"

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        out["remaining"] = -1 if self.times == -1 else max(0, self.times - self.used)
        return out


_RULE_FIELDS = frozenset(
    {"kind", "path", "after", "times", "status", "retry_after", "delay", "location", "host"}
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_fault(rule: dict[str, Any]) -> _FaultRule:
    """Validate one rule up front, so a typo fails at add_fault and not mid-test."""
    if not isinstance(rule, dict):
        raise ValueError("a fault rule must be a JSON object")
    unknown = set(rule) - _RULE_FIELDS
    if unknown:
        raise ValueError(f"unknown fault rule fields: {sorted(unknown)}")
    kind = rule.get("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault kind must be one of {sorted(FAULT_KINDS)}, got {kind!r}")
    parsed = _FaultRule(kind=kind)
    _check(rule, "path", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    _check(rule, "after", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(rule, "times", lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 or an integer >= 1")
    _check(rule, "status", lambda v: _is_int(v) and 100 <= v <= 599, "an HTTP status code")
    _check(rule, "retry_after", lambda v: isinstance(v, str) or _is_int(v), "a string")
    _check(rule, "delay", lambda v: isinstance(v, (int, float)) and v >= 0, "seconds >= 0")
    _check(rule, "location", lambda v: isinstance(v, str) and v != "", "a URL")
    _check(rule, "host", lambda v: isinstance(v, str) and v != "", "a URL like http://h:p")
    for name in _RULE_FIELDS - {"kind"}:
        if name in rule:
            setattr(parsed, name, rule[name])
    if parsed.retry_after is not None:
        parsed.retry_after = str(parsed.retry_after)
    if kind == "redirect" and parsed.location is None:
        raise ValueError("a redirect fault needs 'location'")
    if kind == "foreign_next" and parsed.host is None:
        raise ValueError("a foreign_next fault needs 'host'")
    return parsed


def _check(rule: dict[str, Any], name: str, ok: Callable[[Any], bool], wanted: str) -> None:
    if name in rule and not ok(rule[name]):
        raise ValueError(f"fault field {name!r} must be {wanted}, got {rule[name]!r}")


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    target: str  # raw request target (path + query), for redirect loops
    params: list[tuple[str, str]]
    query: dict[str, str]
    headers: dict[str, str]
    base: str  # scheme://host as the client addressed us, for absolute next URLs
    json: Any = None  # the parsed JSON body of a POST


def _json_body(req: _Request) -> dict[str, Any]:
    if not isinstance(req.json, dict):
        raise _HTTPError(400, "this endpoint wants a JSON object body (POST)")
    return req.json


def _with_query(req: _Request, extra: dict[str, Any]) -> _Request:
    """`req` as if `extra` (a body's or header's paging fields) had been query parameters."""
    query = {**req.query, **{k: str(v) for k, v in extra.items() if isinstance(v, str | int)}}
    return replace(req, query=query)


def _json(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _Response(status, orjson.dumps(payload), headers=list(headers))


def _error(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> _Response:
    return _json(status, {"error": message, "status": status}, headers)


def _merge_query(params: list[tuple[str, str]], updates: dict[str, str]) -> str:
    """Keep the request's params in order, replace `updates`, and never echo api_key."""
    pending = dict(updates)
    out: list[tuple[str, str]] = []
    for key, value in params:
        if key == "api_key":
            continue
        if key in updates:
            if key in pending:
                out.append((key, pending.pop(key)))
            continue
        out.append((key, value))
    out.extend(pending.items())
    return urlencode(out)


def _rows(view: _View, start: int, end: int) -> bytes:
    return b"[" + b",".join(view.blobs[start:end]) + b"]"


def _int_param(query: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _HTTPError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise _HTTPError(400, f"{name} must be >= {minimum}, got {value}")
    return value


def _size_param(query: dict[str, str], name: str) -> int:
    """Page sizes default to 100 and are capped, not rejected, above MAX_PAGE_SIZE."""
    if query.get(name) == "max":
        return MAX_PAGE_SIZE
    return min(_int_param(query, name, DEFAULT_PAGE_SIZE, 1), MAX_PAGE_SIZE)


def _time_param(query: dict[str, str], name: str) -> float | None:
    raw = query.get(name, "")
    if raw == "":
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise _HTTPError(400, f"{name} must be an ISO-8601 timestamp, got {raw!r}") from None


def _token_for(key: tuple[int, int]) -> str:
    return encode_token(iso(key[0]), key[1])


_ZERO_TOKEN = encode_token(*ZERO_TOKEN_KEY)


# --------------------------------------------------------------------------- the API


class DemoAPI:
    """A loopback HTTP server over a deterministic item set, with fault injection.

    Use as `with DemoAPI(items=500) as api: httpx.get(api.url + "/cursor/items")`.
    """

    def __init__(
        self,
        items: int = 5000,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        seed: int = 0,
    ) -> None:
        self.host = host
        self.token = token
        self._oauth_clients: dict[str, tuple[str, float]] = {}
        self._issued: dict[str, float] = {}
        self._tokens_issued = 0
        self.seed = seed
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[_FaultRule] = []
        self._requests: list[dict[str, Any]] = []
        self._step = timestamp_step(items)
        self._records: dict[int, _Record] = {}
        self._next_id = 1
        self._latest = START_EPOCH - self._step
        self._store(_generate(1, items, START_EPOCH, self._step, seed))
        self._data = _Snapshot(self._records.values())
        customers = make_customers(seed)
        self._customer_ids = [c["id"] for c in customers]
        self._customer_view = _View(
            [(c["id"], c["id"]) for c in customers], [orjson.dumps(c) for c in customers]
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[str, Callable[[_Request, _FaultRule | None], _Response]] = {
            "/db/items.json": self._datasette,
            "/next/items": self._next_style,
            "/cursor/items": self._cursor_style,
            "/link/items": self._link_style,
            "/offset/items": self._offset_style,
            "/page/items": self._page_style,
            "/customers": self._customers,
            "/header/items": self._header_style,
            "/stripe/items": self._stripe_style,
            "/drf/items": self._drf_style,
            "/capped/items": self._capped_style,
            "/search/items": self._search_style,
            "/notion/items": self._notion_style,
            "/graphql": self._graphql,
        }

    # -- lifecycle

    def start(self) -> DemoAPI:
        """Bind and serve in a daemon thread; after stop(), restarts on the same port."""
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), self)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() returns within ~50 ms
            name=f"pagesync-demo-api:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and cut open keep-alive connections, so clients see the outage."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> DemoAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None and self._port == 0:
            raise RuntimeError("DemoAPI is not started")
        return self._port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:54321."""
        return f"http://{self.netloc}"

    # -- in-process control

    def add_fault(self, **rule: Any) -> None:
        """Append one fault rule (see FAULT_KINDS); raises ValueError if it is invalid."""
        parsed = parse_fault(rule)
        with self._lock:
            self._faults.append(parsed)

    def add_faults(self, rules: Iterable[dict[str, Any]]) -> None:
        """Append several rules atomically: all valid, or none added."""
        parsed = [parse_fault(rule) for rule in rules]
        with self._lock:
            self._faults.extend(parsed)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[dict[str, Any]]:
        """The rules with their counters, for debugging a test."""
        with self._lock:
            return [rule.describe() for rule in self._faults]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every non-control request so far: method, path, query, headers, fault."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def items(self) -> list[Item]:
        """Current items in (updated_at, id) order, as independent copies."""
        return self._data.items()

    @property
    def customers(self) -> list[Item]:
        return orjson.loads(_rows(self._customer_view, 0, CUSTOMER_COUNT))

    def add_items(self, count: int) -> list[Item]:
        """Append `count` new items (new ids) updated after everything that exists."""
        if not _is_int(count) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        with self._lock:
            new = _generate(self._next_id, count, self._latest + self._step, self._step, self.seed)
            self._store(new)
            self._data = _Snapshot(self._records.values())
        return orjson.loads(orjson.dumps(new))

    def touch_items(self, ids: Iterable[int]) -> None:
        """Give these items one new, latest updated_at: they move to the end of every stream."""
        wanted = list(ids)
        with self._lock:
            self._known(wanted)
            if not wanted:
                return
            self._latest += self._step
            stamp = iso(self._latest)
            for item_id in wanted:
                item = {**self._records[item_id].item, "updated_at": stamp}
                self._records[item_id] = _Record(self._latest, item, orjson.dumps(item))
            self._data = _Snapshot(self._records.values())

    def delete_items(self, ids: Iterable[int]) -> None:
        """Remove these items: they are gone from every stream (deleted upstream)."""
        wanted = list(ids)
        with self._lock:
            self._known(wanted)
            for item_id in wanted:
                del self._records[item_id]
            self._data = _Snapshot(self._records.values())

    def _known(self, ids: list[int]) -> None:
        missing = [i for i in ids if i not in self._records]
        if missing:
            raise ValueError(f"unknown item ids: {missing}")

    def _store(self, items: list[Item]) -> None:
        """Serialize new items once and advance the id and timestamp high-water marks."""
        for item in items:
            epoch = int(parse_time(item["updated_at"]))
            self._records[item["id"]] = _Record(epoch, item, orjson.dumps(item))
            self._latest = max(self._latest, epoch)
            self._next_id = max(self._next_id, item["id"] + 1)

    # -- request handling

    def _log_and_match(self, req: _Request) -> _FaultRule | None:
        """Log the request and pick its fault. Every rule whose path matches counts the
        request, so `after` means "from the (after+1)-th matching request on"."""
        with self._lock:
            chosen: _FaultRule | None = None
            for rule in self._faults:
                if not rule.applies_to(req.path):
                    continue
                rule.seen += 1
                if chosen is None and rule.seen > rule.after and not rule.exhausted:
                    rule.used += 1
                    chosen = rule
            self._requests.append(
                {
                    "method": req.method,
                    "path": req.path,
                    "query": dict(req.query),
                    "headers": req.headers,
                    "json": req.json,
                    "fault": chosen.kind if chosen else None,
                    "at": time.time(),
                }
            )
            return chosen

    def _respond(self, req: _Request, rule: _FaultRule | None = None) -> _Response:
        """The normal answer; `rule` only bends the next-page pointer."""
        try:
            if not self._authorized(req):
                raise _HTTPError(
                    401, "missing or invalid credentials", [("WWW-Authenticate", "Bearer")]
                )
            endpoint = self._route(req.path)
            allowed = "POST" if req.path in POST_ROUTES else "GET"
            if req.method != allowed:
                raise _HTTPError(405, f"{req.method} is not allowed here", [("Allow", allowed)])
            return endpoint(req, rule)
        except _HTTPError as exc:
            return _error(exc.status, exc.message, exc.headers)

    def _authorized(self, req: _Request) -> bool:
        """The static token as a bearer token, basic password, X-API-Key or ?api_key=;
        or a live token issued by /oauth/token."""
        if self.token is None and not self._oauth_clients:
            return True
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            with self._lock:
                expires = self._issued.get(value)
            if expires is not None and expires > time.time():
                return True
        if self.token is None:
            return False
        expected = self.token.encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(value.encode(), expected):
            return True
        if scheme.lower() == "basic":
            try:
                password = base64.b64decode(value).decode().partition(":")[2]
            except ValueError:
                password = ""
            if hmac.compare_digest(password.encode(), expected):
                return True
        if hmac.compare_digest(req.headers.get("x-api-key", "").encode(), expected):
            return True
        return hmac.compare_digest(req.query.get("api_key", "").encode(), expected)

    # -- OAuth2 client credentials (RFC 6749 section 4.4), for auth tests

    def add_oauth_client(self, client_id: str, secret: str, ttl: float = 3600) -> None:
        """Accept `client_id`/`secret` at POST /oauth/token; tokens live `ttl` seconds."""
        with self._lock:
            self._oauth_clients[client_id] = (secret, ttl)

    def revoke_tokens(self) -> None:
        """Forget every issued token: the next request with one gets a 401."""
        with self._lock:
            self._issued.clear()

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return self._tokens_issued

    def _oauth_token(self, req: _Request, body: bytes) -> _Response:
        form = dict(parse_qsl(body.decode(errors="replace")))
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            client_id, _, secret = base64.b64decode(value.strip()).decode().partition(":")
        with self._lock:
            known = self._oauth_clients.get(client_id)
        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type"})
        if known is None or not hmac.compare_digest(known[0].encode(), secret.encode()):
            return _json(401, {"error": "invalid_client"})
        token = base64.urlsafe_b64encode(os.urandom(18)).decode()
        with self._lock:
            self._issued[token] = time.time() + known[1]
            self._tokens_issued += 1
        return _json(200, {"access_token": token, "token_type": "bearer", "expires_in": known[1]})

    def _route(self, path: str) -> Callable[[_Request, _FaultRule | None], _Response]:
        endpoint = self._routes.get(path)
        if endpoint is not None:
            return endpoint
        parts = path.split("/")
        if len(parts) == 4 and parts[0] == "" and parts[3] == "items":
            if parts[1] == "customers":
                customer = self._customer(parts[2])
                return lambda req, rule: self._cursor_style(req, rule, customer=customer)
            if parts[1] == "categories" and parts[2] in CATEGORIES:
                category = parts[2]
                return lambda req, rule: self._cursor_style(req, rule, category=category)
            if parts[1] == "categories":
                raise _HTTPError(404, f"unknown category {parts[2]!r}")
        raise _HTTPError(404, f"no such endpoint: {path}")

    def _customer(self, raw: str) -> int:
        customer = int(raw) if raw.isdigit() else -1
        i = bisect_left(self._customer_ids, customer)
        if i == len(self._customer_ids) or self._customer_ids[i] != customer:
            raise _HTTPError(404, f"unknown customer {raw!r}")
        return customer

    # -- selection helpers

    def _select(
        self, query: dict[str, str], category: str | None = None, customer: int | None = None
    ) -> tuple[_View, int, int]:
        """The view and [lo, hi) range matching the category and updated_at filters."""
        wanted = query.get("category") or None
        if category is not None and wanted is not None and wanted != category:
            view = _EMPTY_VIEW
        else:
            view = self._data.view(category or wanted, customer)
        lo, hi = 0, len(view.keys)
        gte = _time_param(query, "updated_at__gte")
        lt = _time_param(query, "updated_at__lt")
        if gte is not None:
            lo = bisect_left(view.keys, (gte,))
        if lt is not None:
            hi = max(lo, bisect_left(view.keys, (lt,)))
        return view, lo, hi

    @staticmethod
    def _seek(view: _View, lo: int, hi: int, query: dict[str, str], name: str) -> int:
        """First index after the keyset token's record, within [lo, hi]."""
        token = query.get(name, "")
        if token == "":
            return lo
        try:
            updated_at, item_id = decode_token(token)
            key = (parse_time(updated_at), item_id)
        except ValueError:
            raise _HTTPError(400, f"{name} is not a valid page token") from None
        return bisect_right(view.keys, key, lo, hi)

    @staticmethod
    def _next_token(
        view: _View, end: int, hi: int, current: str, rule: _FaultRule | None
    ) -> str | None:
        """Token of the page's last record, or the current one again under repeat_token."""
        if rule is not None and rule.kind == "repeat_token":
            return current or _ZERO_TOKEN
        return _token_for(view.keys[end - 1]) if end < hi else None

    @staticmethod
    def _url(req: _Request, updates: dict[str, str], rule: _FaultRule | None, base: str) -> str:
        """A next-page URL on `base` (empty = relative), moved elsewhere by foreign_next."""
        if rule is not None and rule.kind == "foreign_next":
            base = rule.host_base
        return f"{base}{req.path}?{_merge_query(req.params, updates)}"

    def _keyset(
        self,
        req: _Request,
        rule: _FaultRule | None,
        size_name: str,
        token_name: str,
        category: str | None = None,
        customer: int | None = None,
    ) -> tuple[bytes, str | None]:
        """Shared keyset paging: the rows and the next token."""
        size = _size_param(req.query, size_name)
        view, lo, hi = self._select(req.query, category, customer)
        start = self._seek(view, lo, hi, req.query, token_name)
        end = min(start + size, hi)
        token = self._next_token(view, end, hi, req.query.get(token_name, ""), rule)
        return _rows(view, start, end), token

    # -- endpoints

    def _datasette(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Datasette's table JSON: rows plus an opaque `_next` token and an absolute next_url."""
        rows, token = self._keyset(req, rule, "_size", "_next")
        next_url = None if token is None else self._url(req, {"_next": token}, rule, req.base)
        body = b'{"rows":%s,"next":%s,"next_url":%s}' % (
            rows,
            orjson.dumps(token),
            orjson.dumps(next_url),
        )
        return _Response(200, body)

    def _next_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """A relative next_url (path + query), the common "links" style."""
        rows, token = self._keyset(req, rule, "limit", "after")
        next_url = None if token is None else self._url(req, {"after": token}, rule, "")
        body = b'{"data":{"items":%s},"next_url":%s}' % (rows, orjson.dumps(next_url))
        return _Response(200, body)

    def _cursor_style(
        self,
        req: _Request,
        rule: _FaultRule | None,
        category: str | None = None,
        customer: int | None = None,
    ) -> _Response:
        """A bare cursor in meta.next; foreign_next has no URL to move here."""
        rows, token = self._keyset(req, rule, "limit", "cursor", category, customer)
        return _Response(
            200, b'{"data":{"items":%s},"meta":{"next":%s}}' % (rows, orjson.dumps(token))
        )

    def _link_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """GitHub style: a bare list, and page numbers in the Link header."""
        per_page = _size_param(req.query, "per_page")
        page = _int_param(req.query, "page", 1, 1)
        view, lo, hi = self._select(req.query)
        start = min(hi, lo + (page - 1) * per_page)
        end = min(start + per_page, hi)
        last = max(1, math.ceil((hi - lo) / per_page))
        repeat = rule is not None and rule.kind == "repeat_token"
        next_page = page if repeat else page + 1 if page < last else None
        headers = []
        if next_page is not None:
            nxt = self._url(req, {"page": str(next_page)}, rule, req.base)
            final = self._url(req, {"page": str(last)}, rule, req.base)
            headers.append(("Link", f'<{nxt}>; rel="next", <{final}>; rel="last"'))
        return _Response(200, _rows(view, start, end), headers=headers)

    def _offset_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """limit/offset with a total count; the client computes the next offset."""
        limit = _size_param(req.query, "limit")
        offset = _int_param(req.query, "offset", 0, 0)
        view, lo, hi = self._select(req.query)
        start = min(hi, lo + offset)
        rows = _rows(view, start, min(start + limit, hi))
        return _Response(200, b'{"results":%s,"count":%d}' % (rows, hi - lo))

    def _page_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """page/size with no total: the client stops at the first empty (or short) page."""
        size = _size_param(req.query, "size")
        page = _int_param(req.query, "page", 1, 1)
        view, lo, hi = self._select(req.query)
        start = min(hi, lo + (page - 1) * size)
        return _Response(200, b'{"items":%s}' % _rows(view, start, min(start + size, hi)))

    def _customers(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Customers by id, cursor style; they have no updated_at or category to filter."""
        size = _size_param(req.query, "limit")
        view = self._customer_view
        start = 0
        raw = req.query.get("cursor", "")
        if raw:
            try:
                start = bisect_right(self._customer_ids, int(_unb64(raw)))
            except ValueError:
                raise _HTTPError(400, "cursor is not a valid page token") from None
        end = min(start + size, len(view.blobs))
        if rule is not None and rule.kind == "repeat_token":
            token: str | None = raw or _b64("0")
        else:
            token = _b64(str(self._customer_ids[end - 1])) if end < len(view.blobs) else None
        return _Response(
            200,
            b'{"data":{"items":%s},"meta":{"next":%s}}'
            % (_rows(view, start, end), orjson.dumps(token)),
        )

    # -- the pagination styles of real APIs (issue 17), over the same items

    def _header_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """The next token in an `X-Next-Cursor` header; sent back as ?cursor= or `X-Cursor`."""
        if "x-cursor" in req.headers:
            req = _with_query(req, {"cursor": req.headers["x-cursor"]})
        rows, token = self._keyset(req, rule, "limit", "cursor")
        headers = [("X-Next-Cursor", token)] if token else []
        return _Response(200, b'{"data":%s}' % rows, headers=headers)

    def _stripe_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Stripe's lists: `starting_after=<id of the last record>` and `has_more`."""
        size = _size_param(req.query, "limit")
        view, lo, hi = self._select(req.query)
        start = lo
        raw = req.query.get("starting_after", "")
        if raw:
            record = self._records.get(int(raw)) if raw.isdigit() else None
            if record is None:
                raise _HTTPError(400, f"starting_after: no such object {raw!r}")
            start = bisect_right(view.keys, (record.epoch, record.item["id"]), lo, hi)
        if rule is not None and rule.kind == "repeat_token":
            start = lo
        end = min(start + size, hi)
        return _Response(
            200,
            b'{"object":"list","data":%s,"has_more":%s}'
            % (_rows(view, start, end), b"true" if end < hi else b"false"),
        )

    def _drf_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Django REST Framework's PageNumberPagination: `count`, `next`, `results`, and
        404 {"detail": "Invalid page."} for any page past the last."""
        size = _size_param(req.query, "page_size")
        page = _int_param(req.query, "page", 1, 1)
        view, lo, hi = self._select(req.query)
        last = max(1, math.ceil((hi - lo) / size))
        if page > last:
            return _json(404, {"detail": "Invalid page."})
        start = lo + (page - 1) * size
        end = min(start + size, hi)
        nxt = self._url(req, {"page": str(page + 1)}, rule, req.base) if page < last else None
        body = b'{"count":%d,"next":%s,"previous":null,"results":%s}' % (
            hi - lo,
            orjson.dumps(nxt),
            _rows(view, start, end),
        )
        return _Response(200, body)

    def _capped_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """limit/offset with `total`, refusing offsets above OFFSET_CAP (Elasticsearch's
        max_result_window, Zendesk, HubSpot search)."""
        limit = _size_param(req.query, "limit")
        offset = _int_param(req.query, "offset", 0, 0)
        if offset > OFFSET_CAP:
            return _json(400, {"detail": f"offset must be <= {OFFSET_CAP}"})
        view, lo, hi = self._select(req.query)
        start = min(hi, lo + offset)
        rows = _rows(view, start, min(start + limit, hi))
        return _Response(200, b'{"results":%s,"total":%d}' % (rows, hi - lo))

    def _body_keyset(
        self, req: _Request, size: int, after: tuple[float, int] | None
    ) -> tuple[_View, int, int, bool, int]:
        """A POST's page: the body's filters as query fields, then seek past `after`.
        Returns the view, the page's [start, end), whether more follow, and the total."""
        view, lo, hi = self._select(_with_query(req, _json_body(req)).query)
        start = lo if after is None else bisect_right(view.keys, after, lo, hi)
        end = min(start + size, hi)
        return view, start, end, end < hi, hi - lo

    def _search_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Elasticsearch's search_after: POST {"size", "search_after": [updated_at, id]};
        each hit carries its `sort` values, the next page's search_after."""
        body = _json_body(req)
        size = min(int(body.get("size") or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        after = body.get("search_after")
        key = None
        if after is not None:
            try:
                key = (parse_time(after[0]), int(after[1]))
            except (TypeError, ValueError, IndexError):
                raise _HTTPError(400, "search_after must be [updated_at, id]") from None
        view, start, end, _, total = self._body_keyset(req, size, key)
        hits = []
        for blob in view.blobs[start:end]:
            item = orjson.loads(blob)
            hits.append({**item, "sort": [item["updated_at"], item["id"]]})
        return _json(200, {"hits": {"total": {"value": total}, "hits": hits}})

    def _notion_style(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """Notion's database query: POST {"page_size", "start_cursor"}; `results`,
        `has_more` and `next_cursor` in the answer."""
        body = _json_body(req)
        size = min(int(body.get("page_size") or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        key = self._decode(body.get("start_cursor"), "start_cursor")
        view, start, end, more, _ = self._body_keyset(req, size, key)
        token = _token_for(view.keys[end - 1]) if more else None
        return _Response(
            200,
            b'{"object":"list","results":%s,"has_more":%s,"next_cursor":%s}'
            % (_rows(view, start, end), b"true" if more else b"false", orjson.dumps(token)),
        )

    def _graphql(self, req: _Request, rule: _FaultRule | None) -> _Response:
        """A GraphQL connection `items(first, after, updatedSince)`: edges or nodes (as the
        query asks), pageInfo; faults graphql_throttled / graphql_error answer 200 + errors."""
        if rule is not None and rule.kind == "graphql_throttled":
            error = {"message": "Throttled", "extensions": {"code": "THROTTLED"}}
            return _json(200, {"data": None, "errors": [error]})
        if rule is not None and rule.kind == "graphql_error":
            return _json(200, {"data": None, "errors": [{"message": "Internal server error"}]})
        body = _json_body(req)
        query = str(body.get("query") or "")
        if "items" not in query:
            error = {"message": "Cannot query field: the query must select `items`"}
            return _json(200, {"data": None, "errors": [error]})
        variables = body.get("variables") or {}
        size = min(int(variables.get("first") or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        since = variables.get("updatedSince")
        req = _with_query(req, {"updated_at__gte": since} if since else {})
        key = self._decode(variables.get("after"), "after")
        view, lo, hi = self._select(req.query)
        start = lo if key is None else bisect_right(view.keys, key, lo, hi)
        end = min(start + size, hi)
        nodes = [orjson.loads(b) for b in view.blobs[start:end]]
        cursors = [_token_for(k) for k in view.keys[start:end]]
        conn: dict[str, Any] = {
            "pageInfo": {"hasNextPage": end < hi, "endCursor": cursors[-1] if cursors else None}
        }
        if "nodes" in query and "edges" not in query:
            conn["nodes"] = nodes
        else:
            conn["edges"] = [{"cursor": c, "node": n} for c, n in zip(cursors, nodes, strict=True)]
        return _json(200, {"data": {"items": conn}})

    @staticmethod
    def _decode(token: Any, name: str) -> tuple[float, int] | None:
        if token in (None, ""):
            return None
        try:
            updated_at, item_id = decode_token(str(token))
            return (parse_time(updated_at), item_id)
        except ValueError:
            raise _HTTPError(400, f"{name} is not a valid page token") from None

    # -- faults that replace the answer

    def _fault_response(self, rule: _FaultRule, req: _Request) -> _Response:
        """The replacement answer for the kinds that do not touch the socket."""
        kind = rule.kind
        if kind == "status":
            headers = [("Retry-After", rule.retry_after)] if rule.retry_after is not None else []
            return _error(rule.status, f"injected fault: status {rule.status}", headers)
        if kind == "malformed":
            real = self._respond(req).body
            return _Response(200, real[: max(1, len(real) // 2)] + b"\x00<<garbage, not JSON")
        if kind == "html":
            return _Response(200, _HTML_PAGE, "text/html; charset=utf-8")
        if kind == "empty":
            return _Response(200, b"")
        if kind == "missing_records":
            return _json(200, {"unexpected": True})
        location = req.target if kind == "redirect_loop" else rule.location or "/"
        return _json(302, {"redirect": location}, [("Location", location)])

    # -- control endpoints

    def _control(self, method: str, path: str, body: bytes) -> _Response:
        """/_control/*: no auth, no faults, no logging, so tests can always steer."""
        name = path[len(CONTROL_PREFIX) :].strip("/")
        handler = getattr(self, f"_control_{method.lower()}_{name}", None)
        if name not in ("faults", "requests", "items") or handler is None:
            return _error(404, f"no such control endpoint: {method} {path}")
        try:
            return handler(body)
        except ValueError as exc:  # includes JSON errors and invalid rules
            return _error(400, str(exc))

    def _control_get_faults(self, body: bytes) -> _Response:
        return _json(200, self.faults)

    def _control_post_faults(self, body: bytes) -> _Response:
        """One rule or a list of rules; a bad rule rejects the whole request."""
        payload = orjson.loads(body or b"null")
        self.add_faults(payload if isinstance(payload, list) else [payload])
        return _json(200, {"ok": True, "faults": len(self.faults)})

    def _control_delete_faults(self, body: bytes) -> _Response:
        self.clear_faults()
        return _json(200, {"ok": True})

    def _control_get_requests(self, body: bytes) -> _Response:
        return _json(200, self.requests)

    def _control_delete_requests(self, body: bytes) -> _Response:
        self.clear_requests()
        return _json(200, {"ok": True})

    def _control_get_items(self, body: bytes) -> _Response:
        full = self._data.full
        return _Response(200, _rows(full, 0, len(full.blobs)))

    def _control_post_items(self, body: bytes) -> _Response:
        """{"add": N} and/or {"touch": [ids]}, validated before anything changes."""
        payload = orjson.loads(body or b"null")
        if not isinstance(payload, dict) or not payload or set(payload) - {"add", "touch"}:
            raise ValueError('body must be {"add": N} or {"touch": [ids]}')
        count, touch = payload.get("add", 0), payload.get("touch", [])
        if not _is_int(count) or count < 0:
            raise ValueError('"add" must be an integer >= 0')
        if not isinstance(touch, list) or not all(_is_int(i) for i in touch):
            raise ValueError('"touch" must be a list of item ids')
        self.touch_items(touch)
        added = [item["id"] for item in self.add_items(count)]
        return _json(200, {"ok": True, "added": added, "count": len(self._data.records)})


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its DemoAPI and can cut its open connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: DemoAPI) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api = api
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Skip HTTPServer's getfqdn(): a reverse DNS lookup can stall start() for seconds."""
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up (often on purpose, in fault tests) is not worth a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


_PHRASES = {s.value: s.phrase for s in HTTPStatus}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one write per response, no delayed-ACK stalls
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: benchmarks and tests do not want a stderr line per request."""

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        try:
            body = self._read_body()
            if body is None:
                return
            api = self.server.api
            target = urlsplit(self.path)
            if target.path.startswith(CONTROL_PREFIX):
                self._send(api._control(self.command, target.path, body))
                return
            params = parse_qsl(target.query, keep_blank_values=True)
            host = self.headers.get("host") or api.netloc
            try:
                parsed = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                parsed = None
            req = _Request(
                method=self.command,
                path=target.path,
                target=self.path,
                params=params,
                query=dict(params),
                headers={k.lower(): v for k, v in self.headers.items()},
                base=f"http://{host}",
                json=parsed,
            )
            rule = api._log_and_match(req)
            if target.path == "/oauth/token" and self.command == "POST" and rule is None:
                self._send(api._oauth_token(req, body))
                return
            if rule is None:
                self._send(api._respond(req))
            else:
                self._fault(rule, req)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """Drain the request body so keep-alive stays in sync; None if we gave up."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            self._send(_error(411, "chunked request bodies are not supported"))
            return None
        raw = self.headers.get("content-length") or "0"
        if not raw.isdigit() or int(raw) > MAX_BODY:
            self.close_connection = True
            self._send(_error(400, f"bad Content-Length: {raw!r}"))
            return None
        return self.rfile.read(int(raw)) if int(raw) else b""

    def _fault(self, rule: _FaultRule, req: _Request) -> None:
        api = self.server.api
        if rule.kind == "reset":
            self._reset()
        elif rule.kind == "slow":
            time.sleep(rule.delay)
            self._send(api._respond(req))
        elif rule.kind in ("repeat_token", "foreign_next", "graphql_throttled", "graphql_error"):
            self._send(api._respond(req, rule))
        elif rule.kind == "truncate":
            response = api._respond(req)
            self._send(response, cut=len(response.body) // 2)
            self.close_connection = True
        else:
            self._send(api._fault_response(rule, req))

    def _reset(self) -> None:
        """Abort with RST: SO_LINGER 0 makes close() discard the connection, no FIN."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the real close happens when finish() drops rfile/wfile

    def _send(self, response: _Response, cut: int | None = None) -> None:
        """Head and body in one write; `cut` sends only that many body bytes."""
        body = response.body
        lines = [
            f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, 'Unknown')}",
            "Server: pagesync-demo",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head + (body if cut is None else body[:cut]))


# --------------------------------------------------------------------------- CLI


class _Shutdown(Exception):
    """Raised from the signal handler to leave the serve loop in the main thread."""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pagesync.demo.api", description="Serve the pagesync demo API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--token", default=None, help="require this bearer token / api_key")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _raise_shutdown(signum: int, frame: Any) -> None:
    raise _Shutdown(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the one stdout line tells a parent process the URL."""
    args = _parse_args(argv)
    api = DemoAPI(
        items=args.items, host=args.host, port=args.port, token=args.token, seed=args.seed
    )
    try:
        api.start()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"pagesync demo API listening on {api.url}", flush=True)
        while True:
            time.sleep(3600)
    except _Shutdown:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
