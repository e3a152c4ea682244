"""From one response to the next request: pure functions, no I/O.

A paginator turns the stream's base request and a *token* into the request for a page,
and a response into the token of the page after it. Tokens are small JSON values (a URL,
an opaque cursor, an offset, a page number) so that a checkpoint can store them; the
first page's token is `None` for the link-following paginators.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import config as cfg
from .extract import dig

Token = str | int | None


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What to GET: a path relative to the source's base URL, or an absolute URL."""

    url: str
    params: dict[str, Any] = field(default_factory=dict)


class Paginator(ABC):
    stable_tokens: bool = False

    def __init__(self, spec: Any = None) -> None:
        self.spec = spec
        if spec is not None and spec.stable_tokens:
            self.stable_tokens = True

    def first(self) -> Token:
        """The token of the first page."""
        return None

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        """The request for the page that `token` names."""
        return base

    @abstractmethod
    def next(
        self, token: Token, response: httpx.Response, body: Any, records: list[dict[str, Any]]
    ) -> Token:
        """The next page's token, or None when this was the last page."""


class NextUrl(Paginator):
    """A URL to the next page in the body (absolute, or relative to the response's URL)."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        # The next URL carries every query parameter itself.
        return base if token is None else PageRequest(str(token))

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        url = dig(body, self.spec.path, None)
        return str(response.url.join(url)) if url else None


class LinkHeader(Paginator):
    """RFC 8288 `Link: <...>; rel="next"` (GitHub and most REST APIs)."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        return base if token is None else PageRequest(str(token))

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        link = response.links.get(self.spec.rel)
        url = link.get("url") if link else None
        return str(response.url.join(url)) if url else None


class Cursor(Paginator):
    """An opaque token in the body, sent back as a query parameter."""

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        if token is None:
            return base
        return PageRequest(base.url, {**base.params, self.spec.param: token})

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        value = dig(body, self.spec.path, None)
        return value if value not in (None, "") else None


class Offset(Paginator):
    """limit/offset parameters; a page shorter than the limit is the last."""

    def first(self) -> Token:
        return 0

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        s = self.spec
        return PageRequest(
            base.url, {**base.params, s.limit_param: s.limit, s.offset_param: token or 0}
        )

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        if len(records) < self.spec.limit:
            return None
        return int(token or 0) + self.spec.limit


class PageNumber(Paginator):
    """A page number parameter; an empty page (or one shorter than `size`) is the last."""

    def first(self) -> Token:
        return self.spec.start

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        s = self.spec
        params = {**base.params, s.param: token if token is not None else s.start}
        if s.size and s.size_param:
            params[s.size_param] = s.size
        return PageRequest(base.url, params)

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        if not records or (self.spec.size and len(records) < self.spec.size):
            return None
        return int(token if token is not None else self.spec.start) + 1


class SinglePage(Paginator):
    """No pagination: the first response is all there is."""

    stable_tokens = True

    def next(self, token: Token, response: httpx.Response, body: Any, records: list) -> Token:
        return None


_KINDS: dict[type, type[Paginator]] = {
    cfg.NextUrlPaginator: NextUrl,
    cfg.LinkHeaderPaginator: LinkHeader,
    cfg.CursorPaginator: Cursor,
    cfg.OffsetPaginator: Offset,
    cfg.PageNumberPaginator: PageNumber,
    cfg.SinglePagePaginator: SinglePage,
}


def make_paginator(spec: Any) -> Paginator:
    """The paginator for a stream's `paginator:` config."""
    return _KINDS[type(spec)](spec)
