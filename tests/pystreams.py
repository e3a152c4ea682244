"""Python streams and record models used by the tests (imported by `class:`/`model:`)."""

from __future__ import annotations

import httpx
from pydantic import BaseModel, Field

import pagesync
from pagesync import Page, PageRequest


class CursorItems(pagesync.Stream):
    """The demo API's /cursor/items, read in code: token in `meta.next`, sent as `cursor`."""

    stable_tokens = True

    def request(self, base: PageRequest, token: object) -> PageRequest:
        params = {**base.params, "limit": 120}
        if token is not None:
            params["cursor"] = token
        return PageRequest("/cursor/items", params)

    def parse(self, response: httpx.Response, token: object) -> Page:
        body = response.json()
        return Page(body["data"]["items"], next=body["meta"]["next"])


class Broken(CursorItems):
    def parse(self, response: httpx.Response, token: object) -> Page:
        raise ValueError("the API changed its shape")


class Item(BaseModel):
    id: int
    name: str
    price: float = Field(lt=50)  # the demo's prices go higher: those records are rejected
    updated_at: str


class Leaky(CursorItems):
    """A parse error that quotes the request, credentials included (as careless code does)."""

    def parse(self, response: httpx.Response, token: object) -> Page:
        raise ValueError(f"cannot parse the answer to {dict(response.request.headers)}")
