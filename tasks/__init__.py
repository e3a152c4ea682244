"""Prefect tasks of pagesync: a task per partition, a retried subtask per page."""

from .pages import PageTaskRuns
from .partition import partition_task, tagged

__all__ = ["PageTaskRuns", "partition_task", "tagged"]
