"""pagesync: sync paginated HTTP APIs into SQL databases, checkpointed per page, on Prefect 3.

The public Python API. Its names are imported when first used, and Prefect only when a
sync runs: the `pagesync` command starts by importing this package, and most commands
need neither pydantic's models nor Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.config import Config, load_config, parse_config
    from .core.paginators import PageRequest
    from .core.streams import Page, Stream

_LAZY = {
    "Config": "core.config", "load_config": "core.config", "parse_config": "core.config",
    "PageRequest": "core.paginators", "Page": "core.streams", "Stream": "core.streams",
}  # fmt: skip

__all__ = ["Config", "Page", "PageRequest", "Stream", "load_config", "parse_config", "sync"]
__version__ = "0.1.0"


def sync(config: Config | str, stream: str, **params: Any) -> dict[str, Any]:
    """Run a stream's flow in this process (a config object, or a config file's path).

    Returns the flow's summary; raises an ExceptionGroup of partition errors when any
    partition failed (their committed pages are kept).
    """
    from pagesync.core.config import Config, load_config
    from pagesync.flows.stream import RunHooks, flow_for, run_hooks

    cfg = config if isinstance(config, Config) else load_config(config)
    source = cfg.sources[cfg.stream(stream).source]
    flow = flow_for(stream, source.concurrency)
    path = str(cfg.path) if cfg.path else None
    with run_hooks(RunHooks(config=cfg if isinstance(config, Config) else None)):
        return flow(stream=stream, config=path, **params)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagesync' has no attribute {name!r}")
