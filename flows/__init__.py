"""Prefect flows of pagesync: one flow per stream (installed as `pagesync.flows`)."""

from pagesync.prefect_env import configure as _configure

_configure()

from .stream import flow_for, sync_stream  # noqa: E402

__all__ = ["flow_for", "sync_stream"]
