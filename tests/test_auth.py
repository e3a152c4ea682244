"""Source auth against the real demo API: bearer, basic, API key (header and query),
OAuth2 client credentials with refresh, and Prefect Secret blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import STREAMS, write_config
from helpers import assert_exactly_once

from pagesync.core.config import Source
from pagesync.core.http import SourceClient
from pagesync.core.paginators import PageRequest
from pagesync.demo.api import DemoAPI

TOKEN = "s3cret-T0ken-value"


@pytest.fixture
def secured() -> Any:
    with DemoAPI(items=600, token=TOKEN) as server:
        yield server


def sync(path: Path, stream: str) -> Any:
    from pagesync.flows import flow_for

    return flow_for(stream)(stream=stream, config=str(path), return_state=True)


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "bearer", "token": TOKEN},
        {"type": "basic", "username": "me", "password": TOKEN},
        {"type": "api_key", "name": "X-API-Key", "value": TOKEN},
        {"type": "api_key", "name": "api_key", "value": TOKEN, "in": "query"},
    ],
    ids=["bearer", "basic", "api-key-header", "api-key-query"],
)
def test_auth_kinds_sync_and_keep_the_secret_out_of_state(
    tmp_path: Path, secured: DemoAPI, auth: dict
) -> None:
    path = write_config(
        tmp_path, secured.url, {"items": STREAMS["next_url"]}, source={"auth": auth}
    )
    assert sync(path, "items").is_completed()
    db = tmp_path / "pagesync.db"
    assert_exactly_once(f"sqlite:///{db}", "items", [i["id"] for i in secured.items])
    for f in tmp_path.glob("pagesync.db*"):
        assert TOKEN.encode() not in f.read_bytes(), f"secret stored in {f.name}"


def test_missing_credentials_fail_clearly_without_retrying(
    tmp_path: Path, secured: DemoAPI
) -> None:
    path = write_config(tmp_path, secured.url, {"items": STREAMS["next_url"]})
    state = sync(path, "items")
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert "HTTP 401" in str(exc.exceptions[0]) and "page 1" in str(exc.exceptions[0])
    assert len(secured.requests) == 1  # a 401 is not worth a retry


def test_oauth2_client_credentials_refresh_before_expiry(tmp_path: Path) -> None:
    with DemoAPI(items=600) as api:
        api.add_oauth_client("pagesync", "client-s3cret", ttl=1)
        auth = {"type": "oauth2_client_credentials", "token_url": f"{api.url}/oauth/token",
                "client_id": "pagesync", "client_secret": "client-s3cret", "refresh_before": 1}  # fmt: skip
        path = write_config(
            tmp_path, api.url, {"items": STREAMS["next_url"]}, source={"auth": auth}
        )
        assert sync(path, "items").is_completed()
        pages = len([r for r in api.requests if r["path"] == "/db/items.json"])
        # expires_in - refresh_before <= 0: every request finds its token due for refresh.
        assert api.tokens_issued == pages
        assert_exactly_once(
            f"sqlite:///{tmp_path / 'pagesync.db'}", "items", [i["id"] for i in api.items]
        )


def test_oauth2_refreshes_once_on_401_and_shares_one_token() -> None:
    with DemoAPI(items=300) as api:
        api.add_oauth_client("pagesync", "client-s3cret", ttl=3600)
        source = Source.model_validate({"base_url": api.url, "auth": {
            "type": "oauth2_client_credentials", "token_url": f"{api.url}/oauth/token",
            "client_id": "pagesync", "client_secret": "client-s3cret"}})  # fmt: skip
        client = SourceClient(source)
        for _ in range(3):
            assert client.get(PageRequest("/cursor/items", {"limit": 10})).status_code == 200
        assert api.tokens_issued == 1
        api.revoke_tokens()
        assert client.get(PageRequest("/cursor/items", {"limit": 10})).status_code == 200
        assert api.tokens_issued == 2
        statuses = [r["path"] for r in api.requests]
        assert statuses.count("/oauth/token") == 2
        client.close()


def test_wrong_client_secret_is_a_clear_error(tmp_path: Path) -> None:
    with DemoAPI(items=100) as api:
        api.add_oauth_client("pagesync", "right")
        auth = {"type": "oauth2_client_credentials", "token_url": f"{api.url}/oauth/token",
                "client_id": "pagesync", "client_secret": "wrong-s3cret"}  # fmt: skip
        path = write_config(
            tmp_path, api.url, {"items": STREAMS["next_url"]}, source={"auth": auth}
        )
        state = sync(path, "items")
        text = str(state.result(raise_on_failure=False).exceptions[0])
        assert "OAuth2 token request answered HTTP 401" in text and "wrong-s3cret" not in text


def test_secret_from_a_prefect_secret_block(tmp_path: Path, secured: DemoAPI) -> None:
    from prefect.blocks.system import Secret

    Secret(value=TOKEN).save("pagesync-test-token", overwrite=True)
    auth = {"type": "bearer", "token": {"block": "secret/pagesync-test-token"}}
    path = write_config(
        tmp_path, secured.url, {"items": STREAMS["next_url"]}, source={"auth": auth}
    )
    assert sync(path, "items").is_completed()
    assert_exactly_once(
        f"sqlite:///{tmp_path / 'pagesync.db'}", "items", [i["id"] for i in secured.items]
    )
