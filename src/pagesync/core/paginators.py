"""From one response to the next request: pure functions, no I/O.

A paginator turns the stream's base request and a *token* into the request for a page,
and a response into the token of the page after it. Tokens are small JSON values (a URL,
an opaque cursor, an offset, a page number, a last record's sort values) so that a
checkpoint can store them; the first page's token is `None` for the link-following
paginators. Stop conditions shared by every style (`has_more`, `max_pages`, end-of-data
answers) live on the base class so that each style only says how to move on.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from . import config as cfg
from .errors import ExtractError
from .extract import ABSENT, dig, found_instead

Token = Any  # a JSON value: str, int, a list of sort values, or None


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What to request: a path relative to the source's base URL, or an absolute URL,
    with its query, headers and JSON body. `accept` lists the error answers that are a
    result (end of data, a skipped request) rather than a failure."""

    url: str
    params: dict[str, Any] = field(default_factory=dict)
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    accept: tuple[cfg.Match, ...] = ()


def inject(req: PageRequest, location: str, name: str, value: Any) -> PageRequest:
    """`req` with `value` sent as query parameter, header, or at dotted path `name` in
    the JSON body (a copy: the stream's body template is shared by every page)."""
    if location == "header":
        return replace(req, headers={**req.headers, name: str(value)})
    if location == "body":
        body = copy.deepcopy(req.json) if isinstance(req.json, dict) else {}
        node = body
        *parents, last = name.split(".")
        for step in parents:
            node = node.setdefault(step, {})
        node[last] = value
        return replace(req, json=body, method="POST")
    return replace(req, params={**req.params, name: value})


def base_request(
    stream: cfg.Stream, path: str, params: dict[str, Any], resume: Any = None
) -> PageRequest:
    """A partition's request before any page token: path, params, the JSON body template
    (POST) and the incremental cursor filter from `resume`, where the cursor's `in` says."""
    req = PageRequest(path, {**stream.params, **params}, method=stream.method)
    if stream.body is not None:
        req = replace(req, method="POST", json=copy.deepcopy(stream.body))
    c = stream.cursor
    if resume is not None and c is not None and c.param:
        req = inject(req, c.location, c.param, resume)
    return req


def _missing(key: str, path: str, obj: Any, what: str = "the response") -> ExtractError:
    return ExtractError(
        f"{key}: {path!r} not found in {what} ({found_instead(obj, path)})", transient=False
    )


class Paginator(ABC):
    stable_tokens: bool = False

    def __init__(self, spec: Any = None) -> None:
        self.spec = spec
        if spec is not None and spec.stable_tokens:
            self.stable_tokens = True
        #: Answers after the first page that mean "no more pages" (config's end_of_data).
        self.end_of_data: tuple[cfg.Match, ...] = tuple(getattr(spec, "end_of_data", None) or ())

    def first(self) -> Token:
        """The token of the first page."""
        return None

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        """The request for the page that `token` names."""
        return base

    def accept(self, token: Token) -> tuple[cfg.Match, ...]:
        """Error answers that mean "no more pages": never for the first page, where
        they mean a wrong path or a broken API."""
        return self.end_of_data if self.end_of_data and token != self.first() else ()

    def records(self, body: Any) -> list[dict[str, Any]] | None:
        """The page's records when the style knows where they are (GraphQL); None: the
        stream's `records:` path says."""
        return None

    def advance(
        self, token: Token, response: httpx.Response, body: Any, records: list[dict[str, Any]]
    ) -> Token:
        """The next page's token after the shared stops (`has_more`) had their say."""
        path = getattr(self.spec, "has_more", None)
        if path:
            more = dig(body, path, ABSENT)
            if more is ABSENT:
                raise _missing("paginator.has_more", path, body)
            if not more:
                return None
        return self.next(token, response, body, records)

    @abstractmethod
    def next(
        self, token: Token, response: httpx.Response, body: Any, records: list[dict[str, Any]]
    ) -> Token:
        """The next page's token, or None when this was the last page."""


def resolve(base: httpx.URL, url: Any) -> str:
    """A next-page link resolved against the response's URL.

    An absolute http(s) link, what most APIs send, is taken as sent: the request parses it
    anyway, and httpx's `join` parses both URLs again, more CPU than the rest of a
    100-record page's bookkeeping.
    """
    if isinstance(url, str) and url[:8].lower().startswith(("https://", "http://")):
        return url
    return str(base.join(url))


class NextUrl(Paginator):
    """A URL to the next page in the body (absolute, or relative to the response's URL)."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        # The next URL carries every query parameter itself.
        return base if token is None else replace(base, url=str(token), params={})

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        url = dig(body, self.spec.path, None)
        return resolve(response.url, url) if url else None


class LinkHeader(Paginator):
    """RFC 8288 `Link: <...>; rel="next"` (GitHub and most REST APIs)."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        return base if token is None else replace(base, url=str(token), params={})

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        link = response.links.get(self.spec.rel)
        url = link.get("url") if link else None
        return resolve(response.url, url) if url else None


class _Injected(Paginator):
    """Sends its token where the config's `param` and `in` say: query, header or body."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        if token is None:
            return base
        return inject(base, self.spec.location, self.spec.param, token)


class Cursor(_Injected):
    """An opaque token in the body, sent back as a query parameter (or header, or body)."""

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        value = dig(body, self.spec.path, None)
        return value if value not in (None, "") else None


class HeaderCursor(_Injected):
    """An opaque token in a response header (`X-Next-Cursor`)."""

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        return response.headers.get(self.spec.header) or None


class LastRecord(_Injected):
    """Stripe's `starting_after=<id of the last record>`, Elasticsearch's `search_after`:
    the token is a value of the page's last record, so it stays valid to resume from."""

    stable_tokens = True

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        if not records:
            return None
        value = dig(records[-1], self.spec.field, ABSENT)
        if value is ABSENT or value is None:
            raise _missing("paginator.field", self.spec.field, records[-1], "the last record")
        return value


class GraphQL(Paginator):
    """A GraphQL connection: `$cursor` from `pageInfo.endCursor`, `hasNextPage` the stop,
    records at `edges[].node` or `nodes`; `errors` in a 200 answer fail the page."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        s = self.spec
        template = base.json if isinstance(base.json, dict) else {}
        variables = {**s.variables, **template.get("variables", {})}
        if token is not None:
            variables[s.cursor_variable] = token
        payload = {**template, "query": s.query, "variables": variables}
        return replace(base, method="POST", json=payload)

    def records(self, body: Any) -> list[dict[str, Any]]:
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            raise graphql_error(errors)
        conn = dig(body, self.spec.connection, ABSENT)
        if not isinstance(conn, dict):
            raise _missing("paginator.connection", self.spec.connection, body)
        if "nodes" in conn:
            return list(conn["nodes"] or [])
        if "edges" in conn:
            return [e["node"] for e in conn["edges"] or [] if isinstance(e, dict) and "node" in e]
        raise _missing("paginator.connection", f"{self.spec.connection}.edges", body)

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        info = dig(body, f"{self.spec.connection}.pageInfo", None)
        if not isinstance(info, dict):
            raise _missing("paginator.connection", f"{self.spec.connection}.pageInfo", body)
        if not info.get("hasNextPage"):
            return None
        return info.get("endCursor") or None


_THROTTLED = ("throttl", "rate limit", "ratelimit", "too many requests")


def graphql_error(errors: Any) -> ExtractError:
    """GraphQL's `errors` in a 200 answer: a page failure, worth a retry when throttled."""
    first = errors[0] if isinstance(errors, list) and errors else errors
    message = first.get("message", "") if isinstance(first, dict) else str(first)
    code = dig(first, "extensions.code", "") if isinstance(first, dict) else ""
    said = f"{message} {code}".lower()
    throttled = any(word in said for word in _THROTTLED)
    more = f" (and {len(errors) - 1} more)" if isinstance(errors, list) and len(errors) > 1 else ""
    return ExtractError(
        f"paginator.query: the API answered a GraphQL error: "
        f"{str(message)[:200]}{f' [{code}]' if code else ''}{more}",
        transient=throttled,
    )


def _total(spec: Any, body: Any) -> int | None:
    """The total count at `paginator.total`, when the config names one."""
    if not spec.total:
        return None
    value = dig(body, spec.total, ABSENT)
    if isinstance(value, bool) or not isinstance(value, int):
        if value is ABSENT:
            raise _missing("paginator.total", spec.total, body)
        raise ExtractError(
            f"paginator.total: {spec.total!r} holds {value!r}, not a count", transient=False
        )
    return value


class Offset(Paginator):
    """limit/offset parameters; a page shorter than the limit, or the total, is the last."""

    def first(self) -> Token:
        return 0

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        s = self.spec
        return replace(
            base, params={**base.params, s.limit_param: s.limit, s.offset_param: token or 0}
        )

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        s = self.spec
        nxt = int(token or 0) + s.limit
        total = _total(s, body)
        if len(records) < s.limit or (total is not None and nxt >= total):
            return None
        if s.max_offset is not None and nxt > s.max_offset:
            beyond = f" of {total}" if total is not None else ""
            raise ExtractError(
                f"paginator.max_offset: the next page needs offset {nxt}, past the API's cap "
                f"of {s.max_offset}; records after {s.max_offset + s.limit}{beyond} cannot be "
                "reached by offset (partition the stream, e.g. by date, so each slice stays "
                "under the cap)",
                transient=False,
            )
        return nxt


class PageNumber(Paginator):
    """A page number parameter; an empty page, one shorter than `size`, a page reaching
    the total, or an end-of-data answer (DRF's 404 "Invalid page.") is the last."""

    def first(self) -> Token:
        return self.spec.start

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        s = self.spec
        params = {**base.params, s.param: token if token is not None else s.start}
        if s.size and s.size_param:
            params[s.size_param] = s.size
        return replace(base, params=params)

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        s = self.spec
        if not records or (s.size and len(records) < s.size):
            return None
        page = int(token if token is not None else s.start)
        total = _total(s, body)
        if total is not None and (page - s.start + 1) * (s.size or len(records)) >= total:
            return None
        return page + 1


class SinglePage(Paginator):
    """No pagination: the first response is all there is."""

    stable_tokens = True

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        return None


_KINDS: dict[type, type[Paginator]] = {
    cfg.NextUrlPaginator: NextUrl,
    cfg.LinkHeaderPaginator: LinkHeader,
    cfg.CursorPaginator: Cursor,
    cfg.HeaderCursorPaginator: HeaderCursor,
    cfg.LastRecordPaginator: LastRecord,
    cfg.GraphQLPaginator: GraphQL,
    cfg.OffsetPaginator: Offset,
    cfg.PageNumberPaginator: PageNumber,
    cfg.SinglePagePaginator: SinglePage,
}


def make_paginator(spec: Any) -> Paginator:
    """The paginator for a stream's `paginator:` config."""
    return _KINDS[type(spec)](spec)
