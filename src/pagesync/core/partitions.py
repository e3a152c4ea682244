"""From a stream's config to its partitions: datetime windows, listed values, parent records.

A partition is a slice of a stream with its own checkpoint. Its `key` is the label people
see in the UI and the CLI, so datetime windows carry their start date in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from . import config as cfg

DEFAULT_KEY = "all"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class PartitionSpec:
    """One partition: its label, the path and params it adds to the stream's request."""

    key: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    #: For datetime windows: the window's end, so a window that grew (end = now) reopens.
    window_end: str | None = None
    window_start: str | None = None


def window_label(start: datetime, end: datetime) -> str:
    """`2024-01-03` for a whole aligned day, else `start..end` in ISO 8601."""
    midnight = start.hour == start.minute == start.second == start.microsecond == 0
    if midnight and end - start == timedelta(days=1):
        return start.strftime("%Y-%m-%d")
    return f"{iso(start)}..{iso(end)}"


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def windows(start: datetime, end: datetime, step: timedelta) -> Iterable[tuple[datetime, datetime]]:
    """Half-open [start, end) windows of `step`; the last one is cut at `end`."""
    lo = start
    while lo < end:
        hi = min(lo + step, end)
        yield lo, hi
        lo = hi


def datetime_partitions(
    stream: cfg.Stream,
    spec: cfg.DatetimePartitions,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[PartitionSpec]:
    """Windows over [start, end); `start`/`end` override the config's (backfills do)."""
    lo = start or spec.start
    hi = end or spec.end or now()
    start_param = spec.start_param or (stream.cursor.param if stream.cursor else None)
    out = []
    for a, b in windows(lo, hi, spec.step):
        # A window cut short by `end` keeps the label of the full step, so it is found again.
        label = window_label(a, a + spec.step)
        params: dict[str, Any] = {}
        if start_param:
            params[start_param] = a.strftime(spec.format)
        if spec.end_param:
            params[spec.end_param] = b.strftime(spec.format)
        out.append(
            PartitionSpec(label, stream.path, params, window_end=iso(b), window_start=iso(a))
        )
    return out


def substitute(path: str, name: str, value: Any) -> str:
    return path.replace("{" + name + "}", quote(str(value), safe=""))


def list_partitions(stream: cfg.Stream, spec: cfg.ListPartitions) -> list[PartitionSpec]:
    out = []
    for value in spec.values:
        params = {spec.param: value} if spec.param else {}
        out.append(PartitionSpec(str(value), substitute(stream.path, "value", value), params))
    return out


def parent_partitions(
    stream: cfg.Stream, spec: cfg.ParentPartitions, values: Iterable[Any]
) -> list[PartitionSpec]:
    placeholder = f"parent.{spec.key}"
    return [
        PartitionSpec(f"{spec.key}={v}", substitute(stream.path, placeholder, v))
        for v in dict.fromkeys(values)
        if v is not None
    ]


def plan(
    stream: cfg.Stream,
    *,
    parent_values: Callable[[cfg.ParentPartitions], Iterable[Any]] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[PartitionSpec]:
    """The stream's partitions; a stream without `partitions:` has one, `all`."""
    p = stream.partitions
    if start is not None or end is not None:
        # A backfill: the stream's windows if it has them, else days on the cursor param.
        spec = (
            p
            if isinstance(p, cfg.DatetimePartitions)
            else cfg.DatetimePartitions(
                type="datetime", start=start or datetime(1970, 1, 1, tzinfo=UTC)
            )
        )
        return datetime_partitions(stream, spec, start=start, end=end)
    if p is None:
        return [PartitionSpec(DEFAULT_KEY, stream.path, {})]
    if isinstance(p, cfg.DatetimePartitions):
        return datetime_partitions(stream, p)
    if isinstance(p, cfg.ListPartitions):
        return list_partitions(stream, p)
    if parent_values is None:
        raise ValueError("parent partitions need the parent stream's values")
    return parent_partitions(stream, p, parent_values(p))
