"""How a stream reads its pages: from YAML (a paginator and a records path) or from Python.

A stream answers two questions: what request fetches the page a token names, and what
records and next token a response holds. Everything else (checkpoints, retries,
partitions, leases, the Prefect mapping) is the engine's, so a Python stream gets all of
it by subclassing `Stream` and naming the class in pagesync.yaml:

    streams:
      orders:
        class: streams:Orders      # streams.py next to pagesync.yaml, or an installed module
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

import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
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
    #: Stop after this many pages of a partition (None: no limit).
    max_pages: int | None = None

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
        self.max_pages = config.paginator.max_pages
        # The answers a page's request accepts, built once: without and with end-of-data.
        self._actions = tuple(config.response_actions)
        self._actions_or_end = (*self.paginator.end_of_data, *self._actions)

    def first(self) -> Token:
        return self.paginator.first()

    def request(self, base: PageRequest, token: Token) -> PageRequest:
        req = self.paginator.request(base, token)
        accept = self._actions_or_end if self.paginator.accept(token) else self._actions
        return replace(req, accept=accept) if accept else req

    def parse(self, response: httpx.Response, token: Token) -> Page:
        if response.status_code >= 300:  # an answer `request` accepted: no more records
            return Page([], None)
        body = parse_body(response.content, response.headers.get("content-type"))
        records = self.paginator.records(body)
        if records is None:
            records = records_at(body, self.config.records)
        return Page(records, self.paginator.advance(token, response, body, records))


def project_package(folder: Path) -> str:
    """The private package a config folder's modules load under, made once per folder.

    A reference `streams:Orders` in the pagesync.yaml of /a/b loads /a/b/streams.py as
    `pagesync_project_<hash of /a/b>.streams`: the same on every runner (the CLI, a served
    deployment, a worker, whatever its working folder and sys.path), and never the
    `streams` of another project loaded in the same process. Modules of one folder import
    each other relatively (`from .models import Order`).
    """
    folder = folder.resolve()
    name = f"pagesync_project_{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return name


def _in_folder(module_name: str, folder: Path) -> bool:
    top = folder / module_name.split(".")[0]
    return top.with_suffix(".py").is_file() or (top / "__init__.py").is_file()


def load_object(ref: str, *, key: str, folder: Path | None = None) -> Any:
    """`module:Name` to the object it names: the module from the config's `folder` first,
    else an installed one; a ConfigError naming the config `key` and what failed."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{ref!r} must look like module:Name", key=key)
    local = folder is not None and _in_folder(module_name, folder)
    full = f"{project_package(folder)}.{module_name}" if local and folder else module_name
    try:
        module = importlib.import_module(full)
    except ImportError as e:
        if local or e.name != module_name.split(".")[0]:  # failed inside the user's module
            raise ConfigError(f"{ref!r}: importing {module_name} failed: {e}", key=key) from None
        where = f"no {module_name}.py in {folder} and n" if folder else "N"
        raise ConfigError(f"{ref!r}: {where}o installed module {module_name}", key=key) from None
    except Exception as e:  # the user's module raised while it was imported
        raise ConfigError(
            f"{ref!r}: importing {module_name} failed: {type(e).__name__}: {e}", key=key
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{ref!r}: {module_name} has no {attr}", key=key) from None


def make_stream(config: cfg.Stream, name: str, folder: Path | None = None) -> Stream:
    """The reader for stream `name`: its `class:` if it names one (looked up in the config's
    `folder` first), else Declarative."""
    if config.class_ is None:
        return Declarative(config)
    key = f"streams.{name}.class"
    obj = load_object(config.class_, key=key, folder=folder)
    if not (isinstance(obj, type) and issubclass(obj, Stream)):
        raise ConfigError(f"{config.class_!r} is not a subclass of pagesync.Stream", key=key)
    return obj(config)


def record_model(
    config: cfg.Stream, name: str, folder: Path | None = None
) -> type[BaseModel] | None:
    """The pydantic model stream `name`'s records are validated with, if it names one."""
    if config.model is None:
        return None
    key = f"streams.{name}.model"
    obj = load_object(config.model, key=key, folder=folder)
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ConfigError(f"{config.model!r} is not a pydantic model", key=key)
    return obj


def user_code(config: cfg.Config, name: str) -> tuple[Stream, type[BaseModel] | None]:
    """Stream `name`'s reader and record model, resolved against its config file's folder
    (a config built in code has none: installed modules only)."""
    folder = config.path.parent if config.path else None
    spec = config.stream(name)
    try:
        return make_stream(spec, name, folder), record_model(spec, name, folder)
    except ConfigError as e:  # found now, named as if found when the file was read
        file = str(config.path) if config.path else None
        raise ConfigError(e.detail, file=file, key=e.key) from None
