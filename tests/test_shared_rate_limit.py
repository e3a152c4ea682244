"""The rate limit shared by every worker: a Prefect global concurrency limit, on the tests'
real Prefect server. Two processes' worth of limiters draw from one limit; a Retry-After
one of them is told holds the other back too."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect.client.orchestration import get_client

from pagesync.prefect.ratelimit import SharedRateLimiter, ensure_limit, limit_name

pytestmark = pytest.mark.usefixtures("prefect_api_url")


def _source() -> str:
    return f"src-{uuid.uuid4().hex[:8]}"


def test_ensure_limit_creates_then_updates_one_decaying_slot() -> None:
    source = _source()
    assert ensure_limit(source, 5) == limit_name(source)
    assert ensure_limit(source, 8) == limit_name(source)
    with get_client(sync_client=True) as client:
        gcl = client.read_global_concurrency_limit_by_name(limit_name(source))
    assert (gcl.limit, gcl.slot_decay_per_second, gcl.active) == (1, 8, True)


def test_limiters_sharing_a_limit_are_spaced_by_its_rate() -> None:
    source, rate = _source(), 10.0
    ensure_limit(source, rate)
    a, b = SharedRateLimiter(source, rate), SharedRateLimiter(source, rate)
    stamps = []
    for limiter in (a, b, a, b, a, b):
        limiter.wait()
        stamps.append(time.monotonic())
    gaps = [y - x for x, y in zip(stamps, stamps[1:], strict=False)]
    # The server counts decay in whole slots: one slot a tenth of a second.
    assert min(gaps) >= 0.9 / rate, gaps


def test_retry_after_told_to_one_limiter_holds_back_the_other() -> None:
    source, rate = _source(), 10.0
    ensure_limit(source, rate)
    told, other = SharedRateLimiter(source, rate), SharedRateLimiter(source, rate)
    told.pause(1.5)
    began = time.monotonic()
    other.wait()
    assert time.monotonic() - began >= 1.2
