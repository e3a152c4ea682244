"""The `pagesync` command line (typer), on top of the core and the Prefect layer."""

from __future__ import annotations

import gc


def main() -> None:
    """The `pagesync` console script."""
    gc.disable()  # while importing, as launch.quiet_gc says
    try:
        from .app import main as run
    finally:
        gc.enable()
    run()
