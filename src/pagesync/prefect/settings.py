"""Prefect settings pagesync needs, applied before Prefect is imported.

They are defaults only (os.environ.setdefault): a user's own settings always win. They
make a fresh machine work (a first ephemeral-server start can take longer than Prefect's
own 20 s limit), keep an offline machine quiet, and send pagesync's own log lines to the
flow run's logs in the UI.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

DEFAULTS = {
    # The first start of the embedded server migrates its database: 10-20 s, sometimes more.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pagesync",
    # "Finished in state Completed()" per page task: about a third of a task run's client
    # cost and a log row on the server each; the UI shows task run states without it.
    # Warnings and failures (with their tracebacks) still reach the logs.
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
}


def prefect_home(env: Mapping[str, str] = os.environ) -> Path:
    """PREFECT_HOME as Prefect resolves it, read without importing Prefect (the local
    server and its runs live there)."""
    return Path(env.get("PREFECT_HOME", "~/.prefect")).expanduser()


class UnreadableProfiles(Exception):
    """The Prefect profiles file exists but cannot be read or parsed."""


def profile(env: Mapping[str, str] = os.environ) -> dict[str, object]:
    """The active Prefect profile's settings, read as Prefect reads them (PREFECT_PROFILES_PATH,
    else PREFECT_HOME/profiles.toml; PREFECT_PROFILE, else the file's `active`) without
    importing Prefect. Empty when there is no profiles file; UnreadableProfiles when it is
    broken, so each caller decides what a broken file means for it."""
    path = Path(env.get("PREFECT_PROFILES_PATH") or prefect_home(env) / "profiles.toml")
    try:
        data = tomllib.loads(path.expanduser().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UnreadableProfiles(str(e)) from e
    active = env.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return dict(data.get("profiles", {}).get(active, {}))


def setting(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """A Prefect setting from the environment, else from the active profile (None if unset
    or the profiles file is unreadable)."""
    if env.get(name):
        return env[name]
    try:
        value = profile(env).get(name)
    except UnreadableProfiles:
        return None
    return str(value) if value else None


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def drain_prefect_workers(timeout: float) -> None:
    """Let Prefect's event and log workers send what they hold, if Prefect is imported:
    before a process exits without its teardown, or before the server it sends to stops.

    The page task runs' own sender needs nothing here: every partition waits for its
    pages' events before it ends."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout)
