"""Links from the CLI to the Prefect UI: the pages where a page's or a partition's runs are.

The UI's address is found as Prefect finds it (`PREFECT_UI_URL`, else `PREFECT_API_URL`
without its `/api`), from the environment or the active Prefect profile, without
importing Prefect: `pagesync history` and `state` stay quick. The local server pagesync
keeps for `run` serves no UI, so with nothing configured there is no link, only ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..prefect.settings import setting

#: Prefect Cloud's API and UI addresses (Prefect's own defaults for them).
CLOUD_API, CLOUD_UI = "https://api.prefect.cloud/api", "https://app.prefect.cloud"


def ui_url(env: Mapping[str, str] = os.environ) -> str | None:
    """The Prefect UI's base address, derived the way Prefect derives it, or None."""
    explicit = setting("PREFECT_UI_URL", env)
    if explicit:
        return explicit.rstrip("/")
    api = setting("PREFECT_API_URL", env)
    if not api:
        return None
    ui = api.rstrip("/")
    if ui.startswith(CLOUD_API):
        ui = CLOUD_UI + ui[len(CLOUD_API) :]
    ui = ui.removesuffix("/api").replace("/api/", "/")
    return ui.replace("/accounts/", "/account/").replace("/workspaces/", "/workspace/")


def task_run_url(ui: str, task_run_id: str) -> str:
    return f"{ui}/runs/task-run/{task_run_id}"


def flow_run_url(ui: str, flow_run_id: str) -> str:
    return f"{ui}/runs/flow-run/{flow_run_id}"
