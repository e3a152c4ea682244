"""The layers of DESIGN.md hold: the core imports nothing of Prefect, and importing
pagesync's Prefect packages changes nothing in the host application's environment."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pagesync.core

pytestmark = pytest.mark.floor

CORE_MODULES = sorted(
    f"pagesync.core.{m.name}" for m in pkgutil.iter_modules(pagesync.core.__path__)
)


#: Makes `import prefect` (and its submodules) fail in the process it starts.
NO_PREFECT = (
    "import importlib, sys\n"
    "class NoPrefect:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'prefect' or name.startswith('prefect.'):\n"
    "            raise ImportError('prefect is unimportable in this test')\n"
    "sys.meta_path.insert(0, NoPrefect())\n"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).parent,
    )  # fmt: skip


def test_every_core_module_imports_without_prefect() -> None:
    """Each core module (and the public package) imports in a process where `import
    prefect` fails; the test names every module that needed it."""
    assert len(CORE_MODULES) >= 15, CORE_MODULES  # the walk found the core
    modules = ["pagesync", "pagesync.demo.api", *CORE_MODULES]
    code = (
        NO_PREFECT + "failed = []\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        failed.append(f'{name}: {e}')\n"
        "import pagesync\n"
        "pagesync.Stream, pagesync.load_config, pagesync.PageRequest  # the lazy public names\n"
        "print('FAILED', failed)\n"
        "print('PREFECT', [m for m in sys.modules if m.split('.')[0] == 'prefect'])\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "FAILED []" in done.stdout, done.stdout
    assert "PREFECT []" in done.stdout, done.stdout


def test_the_guard_of_the_test_above_works() -> None:
    """The same guard makes a Prefect-layer module fail, so the test above can fail."""
    code = NO_PREFECT + "importlib.import_module('pagesync.flows')\n"
    done = _run(code)
    assert done.returncode != 0 and "prefect is unimportable" in done.stderr


def test_importing_the_prefect_layer_leaves_the_environment_alone() -> None:
    """A host application that imports pagesync's flows, tasks and Prefect package keeps
    its os.environ as it was (settings are applied by the CLI, before Prefect starts)."""
    code = (
        "import os, importlib\n"
        "before = dict(os.environ)\n"
        "for name in ('pagesync', 'pagesync.flows', 'pagesync.tasks', 'pagesync.prefect.deploy',"
        " 'pagesync.prefect.local_server', 'pagesync.prefect.settings', 'pagesync.cli.app'):\n"
        "    importlib.import_module(name)\n"
        "after = dict(os.environ)\n"
        "print('CHANGED', sorted(k for k in before.keys() | after.keys()"
        " if before.get(k) != after.get(k)))\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "CHANGED []" in done.stdout, done.stdout
