"""Prefect flows of pagesync: one flow per stream (installed as `pagesync.flows`)."""

from .stream import RunHooks, flow_for, run_hooks, sync_stream

__all__ = ["RunHooks", "flow_for", "run_hooks", "sync_stream"]
