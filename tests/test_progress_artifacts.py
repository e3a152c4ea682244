"""Progress artifacts: periodic updates off the page's thread, the final one always last."""

from __future__ import annotations

import contextvars
import threading
import uuid

import pytest

from pagesync.core.engine import PartitionOutcome
from pagesync.core.partitions import PartitionSpec
from pagesync.tasks import progress


class Updates:
    """update_progress_artifact, recorded as (thread, percentage, description); a
    periodic update blocks until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, artifact_id: uuid.UUID, pct: float, description: str) -> None:
        if "so far" in description:
            self.started.set()
            assert self.release.wait(30), "the test never released the periodic update"
        self.calls.append((threading.current_thread().name, pct, description))


@pytest.fixture
def updates(monkeypatch: pytest.MonkeyPatch) -> Updates:
    rec = Updates()
    monkeypatch.setattr(progress, "create_progress_artifact", lambda *a, **k: uuid.uuid4())
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "update_progress_artifact", rec)
    return rec


def test_periodic_updates_run_off_the_page_thread_and_the_final_one_comes_last(
    updates: Updates,
) -> None:
    arts = progress.ProgressArtifacts("items")
    arts.start(PartitionSpec("all", "/items"))
    running = PartitionOutcome("all", "running", pages=3, records=300, new_pages=3)

    arts.page_committed("items", running)  # returns at once: the update is in the background
    assert updates.started.wait(30)
    arts.page_committed("items", running)  # one still in flight: skipped, not queued
    assert updates.calls == []

    done = PartitionOutcome("all", "complete", pages=5, records=500, new_pages=5)
    final = threading.Thread(target=arts.partition_done, args=("items", done))
    final.start()
    final.join(0.2)
    assert final.is_alive(), "the final update did not wait for the periodic one"
    updates.release.set()
    final.join(30)

    calls = updates.calls
    assert [(name.startswith("pagesync-progress"), pct) for name, pct, _ in calls] == [
        (True, 0.0),
        (False, 100.0),
    ]
    assert "3 pages, 300 records so far" in calls[0][2]
    assert "complete, 5 pages, 500 records" in calls[1][2]


def test_a_failing_periodic_update_is_logged_and_does_not_stop_the_final_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(progress, "create_progress_artifact", lambda *a, **k: uuid.uuid4())
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)

    def update(artifact_id: uuid.UUID, pct: float, description: str) -> None:
        if "so far" in description:
            raise RuntimeError("API down")
        seen.append(description)

    monkeypatch.setattr(progress, "update_progress_artifact", update)
    arts = progress.ProgressArtifacts("items")
    arts.start(PartitionSpec("all", "/items"))
    arts.page_committed("items", PartitionOutcome("all", "running", pages=1, records=1))
    arts.partition_done("items", PartitionOutcome("all", "complete", pages=1, records=1))
    assert seen == [
        "Progress of partition **all** of stream **items**: complete, 1 pages, 1 records"
    ]
    assert "progress artifact update failed" in caplog.text and "API down" in caplog.text


def test_the_artifact_is_created_off_the_page_thread_and_updates_wait_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """start() returns before the API has answered (the first page need not wait); the
    updates go to the artifact it created, after it, and from the task run's context."""
    release = threading.Event()
    made = uuid.uuid4()
    calls: list[tuple[str, object]] = []
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")

    def create(pct: float, key: str, description: str) -> uuid.UUID:
        assert release.wait(30), "the test never let the creation answer"
        calls.append(("create", (threading.current_thread().name, marker.get())))
        return made

    def update(artifact_id: uuid.UUID, pct: float, description: str) -> None:
        calls.append(("update", artifact_id))

    monkeypatch.setattr(progress, "create_progress_artifact", create)
    monkeypatch.setattr(progress, "update_progress_artifact", update)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
    arts = progress.ProgressArtifacts("items")
    marker.set("task run")
    arts.start(PartitionSpec("all", "/items"))  # returns while creation is held
    arts.page_committed("items", PartitionOutcome("all", "running", pages=1, records=1))
    assert calls == []
    release.set()
    arts.partition_done("items", PartitionOutcome("all", "complete", pages=1, records=1))
    assert calls[0][0] == "create"
    name, ctx = calls[0][1]  # type: ignore[misc]
    assert name.startswith("pagesync-progress") and ctx == "task run"
    assert calls[1:] == [("update", made), ("update", made)]


def test_a_failed_creation_is_logged_and_its_updates_are_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    updated: list[uuid.UUID] = []

    def create(*a: object, **k: object) -> uuid.UUID:
        raise RuntimeError("API down")

    monkeypatch.setattr(progress, "create_progress_artifact", create)
    monkeypatch.setattr(progress, "update_progress_artifact", lambda i, *a, **k: updated.append(i))
    arts = progress.ProgressArtifacts("items")
    arts.start(PartitionSpec("all", "/items"))
    arts.partition_done("items", PartitionOutcome("all", "complete", pages=1, records=1))
    assert updated == []
    assert "progress artifact creation failed" in caplog.text and "API down" in caplog.text
