"""How a stream reads its pages: from YAML (a paginator and a records path) or from Python.

A stream answers two questions: what request fetches the page a token names, and what
records and next token a response holds. Everything else (checkpoints, retries,
partitions, leases, the Prefect mapping) is the engine's, so a Python stream gets all of
it by subclassing `Stream` and naming the class in pagesync.yaml:

    streams:
      orders:
        class: mypkg.streams:Orders
        source: shop
        primary_key: [id]

    class Orders(pagesync.Stream):
        def request(self, base, token):
            return PageRequest("/v2/orders", {**base.params, "after": token or ""})

        def parse(self, response, token):
            body = response.json()
            return Page(body["orders"], next=body.get("after"))
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel

from . import config as cfg
from .errors import ConfigError
from .extract import parse_body, records_at
from .paginators import PageRequest, Paginator, Token, make_paginator


@dataclass
class Page:
    """A parsed page: its records and the token of the next page (None: last page)."""

    records: list[dict[str, Any]]
    next: Token = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stream:
    """Base class of Python streams. Override `parse`, and `request` when the default
    (the config's path and params, the token as `cursor=`) does not fit."""

    #: Whether tokens stay valid to resume from after a crash (see DESIGN: resume points).
    stable_tokens: bool = False

    def __init__(self, config: cfg.Stream) -> None:
        self.config = config

    def first(self) -> Token:
        """The first page's token."""
        return None

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        """The request for the page `token` names; `base` holds path, params, partition and
        cursor filter already."""
        if token is None:
            return base
        return PageRequest(base.url, {**base.params, "cursor": token})

    def parse(self, response: httpx.Response, token: Token) -> Page:
        """Records and next token out of a response."""
        raise NotImplementedError


class Declarative(Stream):
    """A YAML stream: the configured paginator and records path."""

    def __init__(self, config: cfg.Stream) -> None:
        super().__init__(config)
        self.paginator: Paginator = make_paginator(config.paginator)
        self.stable_tokens = self.paginator.stable_tokens

    def first(self) -> Token:
        return self.paginator.first()

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        return self.paginator.request(base, token)

    def parse(self, response: httpx.Response, token: Token) -> Page:
        body = parse_body(response.content, response.headers.get("content-type"))
        records = records_at(body, self.config.records)
        return Page(records, self.paginator.next(token, response, body, records))


def load_object(ref: str, *, what: str) -> Any:
    """`package.module:Name` to the object it names, with an error that says which part failed."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} {ref!r} must look like package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {ref!r}: cannot import {module_name} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} {ref!r}: {module_name} has no {attr}") from None


def make_stream(config: cfg.Stream) -> Stream:
    """The reader for a stream's config: its `class:` if it names one, else Declarative."""
    if config.class_ is None:
        return Declarative(config)
    obj = load_object(config.class_, what="stream class")
    if not (isinstance(obj, type) and issubclass(obj, Stream)):
        raise ConfigError(f"stream class {config.class_!r} is not a subclass of pagesync.Stream")
    return obj(config)


def record_model(config: cfg.Stream) -> type[BaseModel] | None:
    """The pydantic model the stream's records are validated with, if it names one."""
    if config.model is None:
        return None
    obj = load_object(config.model, what="record model")
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ConfigError(f"record model {config.model!r} is not a pydantic model")
    return obj
