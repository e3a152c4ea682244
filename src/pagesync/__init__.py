"""pagesync: sync paginated HTTP APIs into SQL databases, checkpointed per page, on Prefect 3.

The public Python API. Its names are imported when first used, and Prefect only when a
sync runs: the `pagesync` command starts by importing this package, and most commands
need neither pydantic's models nor Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, load_config, parse_config
    from .paginators import PageRequest
    from .streams import Page, Stream

_LAZY = {
    "Config": "config", "load_config": "config", "parse_config": "config",
    "PageRequest": "paginators", "Page": "streams", "Stream": "streams",
}  # fmt: skip

__all__ = ["Config", "Page", "PageRequest", "Stream", "load_config", "parse_config", "sync"]
__version__ = "0.1.0"


def sync(config: Config | str, stream: str, **params: Any) -> dict[str, Any]:
    """Run a stream's flow in this process (a config object, or a config file's path).

    Returns the flow's summary; raises an ExceptionGroup of partition errors when any
    partition failed (their committed pages are kept).
    """
    from pagesync.config import Config, load_config, register
    from pagesync.flows import flow_for

    if isinstance(config, Config):
        source = config.sources[config.stream(stream).source]
        return flow_for(stream, source.concurrency)(
            stream=stream, config=register(config), **params
        )
    cfg = load_config(config)
    source = cfg.sources[cfg.stream(stream).source]
    return flow_for(stream, source.concurrency)(stream=stream, config=str(cfg.path), **params)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagesync' has no attribute {name!r}")
