"""Progress artifacts: periodic updates off the page's thread, the final one always last."""

from __future__ import annotations

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
