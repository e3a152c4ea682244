"""The demo project: a config covering every paginator and partition kind."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def demo_config_text() -> str:
    return files("pagesync").joinpath("templates/demo.yaml").read_text()


def write_demo(folder: Path) -> Path:
    """Write the demo config into `folder` (kept if it exists: it may hold your edits)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pagesync.yaml"
    if not path.exists():
        path.write_text(demo_config_text())
    return path
