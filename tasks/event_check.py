"""A check, once per process, that pagesync's page events are the events Prefect builds.

pagesync builds a page task run's state-change events itself (`page_events`), following
the payload of Prefect's `emit_task_run_state_change_event`. A Prefect release that
changed that payload would make the server mis-record or drop page task runs without a
word. So before the first page event of a process, one synthetic page's Completed event
is built both ways, its related resources included, and the two are compared as the
server reads them. On any difference in a key or value that is not an id or a time, one
warning names it and every page event of the process goes Prefect's own way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.events import Event

log = logging.getLogger("pagesync.events")

#: Keys whose values differ between two builds of one event without meaning anything.
_VOLATILE = frozenset({"id", "follows", "occurred", "prefect.state-timestamp"})

_lock = threading.Lock()
_verdict: bool | None = None  # None: not checked yet in this process


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two events (as JSON) differ, as `key.path: ours != theirs`, leaving out ids
    and times."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in sorted(ours.keys() | theirs.keys(), key=str):
            if key in _VOLATILE or str(key).endswith(("_id", "_time", "timestamp")):
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in theirs:
                found.append(f"{where}: only in pagesync's event ({ours[key]!r})")
            elif key not in ours:
                found.append(f"{where}: only in Prefect's event ({theirs[key]!r})")
            else:
                found.extend(differences(ours[key], theirs[key], where))
        return found
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [d for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
                for d in differences(a, b, f"{path}[{i}]")]  # fmt: skip
    return [] if ours == theirs else [f"{path}: pagesync {ours!r} != Prefect {theirs!r}"]


def built_by_prefect(
    task_run: TaskRun, initial: State[Any] | None, validated: State[Any]
) -> dict[str, Any]:
    """The event Prefect's `emit_task_run_state_change_event` makes of a state change, as
    JSON, captured where it hands it to `emit_event`, in this thread only (any other
    thread's events pass through), and never sent."""
    import prefect.utilities.engine as engine

    captured: list[dict[str, Any]] = []
    me, send = threading.get_ident(), engine.emit_event

    def capture(**kwargs: Any) -> Any:
        if threading.get_ident() != me:
            return send(**kwargs)
        captured.append(kwargs)
        return None

    engine.emit_event = capture
    try:
        engine.emit_task_run_state_change_event(
            task_run=task_run, initial_state=initial, validated_state=validated
        )
    finally:
        engine.emit_event = send
    [kwargs] = captured
    return Event(**kwargs).model_dump(mode="json")


def as_server_reads_it(event: dict[str, Any]) -> dict[str, Any]:
    """An event as the Prefect server validates it (so that equal events compare equal
    whatever their JSON spelling)."""
    return Event.model_validate(event).model_dump(mode="json")


def ours_match(check: Callable[[], tuple[dict[str, Any], dict[str, Any]]]) -> bool:
    """Whether pagesync's page events may be used in this process: `check()` builds the
    same synthetic event pagesync's way and Prefect's way, the first time only."""
    global _verdict
    with _lock:
        if _verdict is None:
            try:
                ours, theirs = check()
                found = differences(as_server_reads_it(ours), as_server_reads_it(theirs))
            except Exception as exc:  # anything unexpected is a difference too
                found = [f"the comparison failed: {exc!r}"]
            if found:
                log.warning(
                    "page task run events: this Prefect builds them differently from pagesync "
                    "(%s); sending them Prefect's own way in this process",
                    "; ".join(found[:5]),
                )
            _verdict = not found
        return _verdict


def forget() -> None:
    """Check again before the next page event (tests; a process that upgraded Prefect
    cannot, as it has imported it)."""
    global _verdict
    with _lock:
        _verdict = None
