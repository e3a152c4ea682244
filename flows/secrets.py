"""Prefect Secret blocks in the config (`{block: secret/NAME}`), read when a run starts.

The value lives only in memory, inside a SecretStr: it is never a flow parameter, never
logged, never stored in pagesync's state.
"""

from __future__ import annotations

from prefect.blocks.system import Secret
from pydantic import SecretStr

from pagesync.core.config import BlockRef, Config


def resolve_secret_blocks(config: Config) -> Config:
    """The config with every secret block reference replaced by the block's value."""
    sources = {}
    for name, source in config.sources.items():
        auth = source.auth
        if auth is not None:
            updates = {
                field: SecretStr(str(Secret.load(value.block.split("/", 1)[1]).get()))
                for field, value in auth
                if isinstance(value, BlockRef)
            }
            if updates:
                source = source.model_copy(update={"auth": auth.model_copy(update=updates)})
        sources[name] = source
    return config.model_copy(update={"sources": sources})
