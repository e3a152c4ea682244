"""A stream written in Python: pagesync supplies checkpoints, retries, partitions, leases
and the Prefect flow; the class says how to ask for a page and what a page holds.

Enable it in pagesync.yaml with `class: streams:Releases`: pagesync loads streams.py from
the folder of pagesync.yaml, wherever it runs (the CLI, `pagesync up`, a Prefect worker).
Other modules of this folder are imported relatively: `from .models import Release`.
"""

from __future__ import annotations

import httpx

import pagesync
from pagesync import Page, PageRequest


class Releases(pagesync.Stream):
    #: Page numbers stay valid across a crash: resume from the stored one.
    stable_tokens = True

    def first(self) -> int:
        return 1

    def request(self, base: PageRequest, token: object) -> PageRequest:
        return PageRequest(
            "/repos/PrefectHQ/prefect/releases", {**base.params, "per_page": 100, "page": token}
        )

    def parse(self, response: httpx.Response, token: object) -> Page:
        records = response.json()
        return Page(records, next=int(token) + 1 if records else None)
