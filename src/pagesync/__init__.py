"""pagesync: sync paginated HTTP APIs into SQL databases, checkpointed per page, on Prefect 3.

The public Python API. Prefect is imported only when a sync runs.
"""

from __future__ import annotations

from typing import Any

from .config import Config, load_config, parse_config, register
from .paginators import PageRequest
from .streams import Page, Stream

__all__ = ["Config", "Page", "PageRequest", "Stream", "load_config", "parse_config", "sync"]
__version__ = "0.1.0"


def sync(config: Config | str, stream: str, **params: Any) -> dict[str, Any]:
    """Run a stream's flow in this process (a config object, or a config file's path).

    Returns the flow's summary; raises an ExceptionGroup of partition errors when any
    partition failed (their committed pages are kept).
    """
    from pagesync.flows import flow_for

    if isinstance(config, Config):
        source = config.sources[config.stream(stream).source]
        return flow_for(stream, source.concurrency)(
            stream=stream, config=register(config), **params
        )
    cfg = load_config(config)
    source = cfg.sources[cfg.stream(stream).source]
    return flow_for(stream, source.concurrency)(stream=stream, config=str(cfg.path), **params)
