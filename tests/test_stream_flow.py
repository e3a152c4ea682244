"""The stream flow stores its parameters as Prefect's own encoder would, without it."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from uuid import UUID

import pytest
from prefect import Flow
from prefect.task_runners import ThreadPoolTaskRunner

from pagesync.flows.stream import StreamFlow, flow_for, sync_stream

PLAIN: list[dict[str, object]] = [
    {"stream": "items", "config": None, "full_refresh": False},
    {"stream": "ítems · 2", "config": "/srv/pagesync.yaml", "full_refresh": True},
    {
        "stream": "items",
        "start": datetime(2024, 1, 1, tzinfo=UTC),
        "end": datetime(2024, 1, 2, 12, 30, 5, 123456),  # naive, with microseconds
        "backfill_id": "b-1",
        "fan_out": "deployment",
    },
    {"n": 3, "x": 1.5, "inf": float("inf")},
]
OTHER: list[dict[str, object]] = [
    {"stream": "items", "day": date(2024, 1, 1)},
    {"stream": "items", "where": Path("/tmp/x"), "id": UUID(int=7)},
    {"stream": "items", "nested": {"a": [1, datetime(2024, 1, 1, tzinfo=UTC)]}},
]


@pytest.mark.parametrize("params", PLAIN + OTHER)
def test_parameters_are_stored_as_prefects_own_encoder_stores_them(
    params: dict[str, object],
) -> None:
    flow = flow_for("items", 2)
    assert flow.serialize_parameters(params) == Flow.serialize_parameters(flow, params)


def test_only_plain_parameters_skip_prefects_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(
        Flow, "serialize_parameters", lambda self, p: seen.append(p) or {"from": "prefect"}
    )
    flow = flow_for("items", 2)
    for params in PLAIN:
        assert flow.serialize_parameters(params) != {"from": "prefect"}
    for params in OTHER:
        assert flow.serialize_parameters(params) == {"from": "prefect"}
    assert seen == OTHER


def test_each_stream_has_its_own_stream_flow() -> None:
    flow = flow_for("orders", 5)
    assert isinstance(sync_stream, StreamFlow) and isinstance(flow, StreamFlow)
    assert (flow.name, flow.flow_run_name, sync_stream.name) == ("orders", "orders", "pagesync")
    assert isinstance(flow.task_runner, ThreadPoolTaskRunner)
    assert flow.task_runner._max_workers == 5  # noqa: SLF001
    assert flow.fn is sync_stream.fn and flow.parameters == sync_stream.parameters


def test_a_stream_flow_takes_other_options_in_the_same_copy() -> None:
    def hook(*_: object) -> None: ...

    flow = flow_for("orders", 3, on_running=[hook], retries=2)
    assert isinstance(flow, StreamFlow) and (flow.name, flow.retries) == ("orders", 2)
    assert flow.on_running_hooks == [hook] and flow.task_runner._max_workers == 3  # noqa: SLF001
    assert sync_stream.on_running_hooks == [] and flow_for("orders").on_running_hooks == []
