"""The `pagesync` command line (typer), on top of the core and the Prefect layer."""

from __future__ import annotations


def main() -> None:
    """The `pagesync` console script."""
    from .app import main as run

    run()
