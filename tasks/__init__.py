"""Prefect tasks of pagesync: a task per partition, a retried subtask per page."""

from pagesync.prefect_env import configure as _configure

_configure()

from .partition import page_task, partition_task, tagged  # noqa: E402

__all__ = ["page_task", "partition_task", "tagged"]
