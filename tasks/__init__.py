"""Prefect tasks of pagesync: a task per partition, a retried subtask per page."""

from pagesync.prefect_env import configure as _configure

_configure()

from .pages import PageTaskRuns  # noqa: E402
from .partition import partition_task, tagged  # noqa: E402

__all__ = ["PageTaskRuns", "partition_task", "tagged"]
