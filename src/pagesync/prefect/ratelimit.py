"""A source's `rate_limit` held across every worker: a Prefect global concurrency limit.

With `fan_out: deployment` a stream's partitions run in many processes on many machines, and
a limiter in each process would let N workers send N times the rate. The limit lives in the
Prefect server instead: `pagesync-rate-<source>`, one slot, decaying at `per_second` slots a
second, so requests from every process are spaced 1/per_second apart (no burst: a limit
of one slot cannot be saved up). `pagesync deploy` and each coordinator create or update it.

A `Retry-After` of S seconds that one worker gets sets the limit's occupied slots to
S x per_second: they take S seconds to decay, and until then no worker gets a slot.
"""

from __future__ import annotations

import contextlib
import logging
import math

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.sync import rate_limit
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from pagesync.core.config import Config

log = logging.getLogger("pagesync")


def limit_name(source: str) -> str:
    return f"pagesync-rate-{source}"


def ensure_limit(source: str, per_second: float) -> str:
    """Create the source's limit, or bring it to `per_second`; its name."""
    name = limit_name(source)
    with get_client(sync_client=True) as client:
        try:
            have = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another coordinator was first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=name, limit=1, slot_decay_per_second=per_second
                    )
                )
            return name
        if have.limit != 1 or have.slot_decay_per_second != per_second or not have.active:
            client.update_global_concurrency_limit(
                name,
                GlobalConcurrencyLimitUpdate(
                    limit=1, slot_decay_per_second=per_second, active=True
                ),
            )
    return name


def ensure_limits(config: Config, streams: list[str] | None = None) -> list[str]:
    """The limits of the sources that `fan_out: deployment` streams read (all such streams
    of the config by default)."""
    names = []
    for stream in streams or list(config.streams):
        spec = config.streams[stream]
        source = config.sources[spec.source]
        if source.rate_limit is not None and spec.fan_out == "deployment":
            names.append(ensure_limit(spec.source, source.rate_limit.per_second))
    return sorted(set(names))


class SharedRateLimiter:
    """A `core.http.Limiter` whose slots come from the source's global concurrency limit."""

    def __init__(self, source: str, per_second: float) -> None:
        self.name = limit_name(source)
        self.per_second = per_second

    def wait(self) -> None:
        rate_limit(self.name, occupy=1, strict=True)

    def pause(self, seconds: float) -> None:
        """Every worker waits `seconds`: the slots it takes to decay are set occupied."""
        slots = max(1, math.ceil(seconds * self.per_second))
        try:
            with get_client(sync_client=True) as client:
                client.update_global_concurrency_limit(
                    self.name, GlobalConcurrencyLimitUpdate(active_slots=slots)
                )
        except Exception:  # the worker that got it still waits; the others may not
            log.warning("could not hold rate limit %s for %.1f s", self.name, seconds,
                        exc_info=True)  # fmt: skip
