"""A warm child sets up Prefect's settings and logging again only for what changed."""

from __future__ import annotations

import prefect.context
import prefect.logging.configuration
import pytest

from pagesync import prefect_env


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []
    monkeypatch.setattr(
        prefect.context, "refresh_global_settings_context", lambda: made.append("settings")
    )
    monkeypatch.setattr(
        prefect.logging.configuration, "setup_logging", lambda: made.append("logging")
    )
    monkeypatch.setattr(prefect_env, "_SETTINGS_ENV", None)
    return made


def test_nothing_is_set_up_again_when_nothing_changed(
    calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect_env.settings_loaded()
    prefect_env.reload_prefect_settings()
    assert calls == []


def test_a_new_server_address_needs_the_settings_only(
    calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect_env.settings_loaded()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    prefect_env.reload_prefect_settings()
    assert calls == ["settings"]
    prefect_env.reload_prefect_settings()  # now known: nothing more
    assert calls == ["settings"]


def test_other_changes_set_up_logging_too(
    calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect_env.settings_loaded()
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO")  # --verbose
    prefect_env.reload_prefect_settings()
    assert calls == ["settings", "logging"]


def test_an_unknown_environment_sets_up_everything(calls: list[str]) -> None:
    prefect_env.reload_prefect_settings()
    assert calls == ["settings", "logging"]
