"""Prefect settings pagesync needs, applied before Prefect is imported.

They are defaults only (os.environ.setdefault): a user's own settings always win. They
make a fresh machine work (a first ephemeral-server start can take longer than Prefect's
own 20 s limit), keep an offline machine quiet, and send pagesync's own log lines to the
flow run's logs in the UI.
"""

from __future__ import annotations

import os
import sys
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
    server, its runs and the warm process all live there)."""
    return Path(env.get("PREFECT_HOME", "~/.prefect")).expanduser()


def configure() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


#: The PREFECT_* variables Prefect's settings and logging were last set up from, when
#: this process knows them (the warm process notes them after importing Prefect).
_SETTINGS_ENV: dict[str, str] | None = None


def prefect_vars(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PREFECT_")}


def settings_loaded() -> None:
    """Note that Prefect just read its settings from the environment as it is now."""
    global _SETTINGS_ENV
    _SETTINGS_ENV = prefect_vars()


def reload_prefect_settings() -> None:
    """Make an already imported Prefect read its settings and logging levels from the
    environment again (a warm child: Prefect was imported before this run's settings).

    Only what changed: nothing, in a warm child of the usual kind (same variables, same
    server), and the settings but not the logging when only the API's address changed.
    Setting up logging again costs 120 ms, the settings 40 ms (measured)."""
    global _SETTINGS_ENV
    now = prefect_vars()
    if now == _SETTINGS_ENV:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    before = _SETTINGS_ENV or {}
    changed = {k for k in now.keys() | before.keys() if now.get(k) != before.get(k)}
    if _SETTINGS_ENV is None or changed - {"PREFECT_API_URL"}:
        setup_logging()  # incremental: the handlers stay, their levels follow the settings
    _SETTINGS_ENV = now


def drain_prefect_workers(timeout: float) -> None:
    """Let Prefect's event and log workers, and the page events' sender, send what they
    hold, if Prefect is imported:
    before a process exits without its teardown, or before the server it sends to stops."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout)
    page_events = sys.modules.get("pagesync.tasks.page_events")
    if page_events is not None:  # the page task runs' own sender (see there)
        page_events.sender().flush(timeout)
