"""Source credentials as httpx Auth objects: bearer, basic, API key, OAuth2 client credentials.

httpx applies an Auth to every request of the client and strips the Authorization header
when a redirect leaves the origin; pagesync's own next-link check covers the rest. Secret
values stay in pydantic SecretStr until the moment they are put on a request.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Generator
from urllib.parse import quote, quote_plus

import httpx
from pydantic import SecretStr

from . import config as cfg
from .errors import ConfigError, HTTPError


def reveal(secret: cfg.Secret) -> str:
    if isinstance(secret, cfg.BlockRef):
        raise ConfigError(
            f"secret block {secret.block!r} was not resolved: secret blocks are read by the "
            "Prefect flow when a run starts"
        )
    return secret.get_secret_value()


class HeaderAuth(httpx.Auth):
    """A fixed header on every request (bearer token, API key)."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self._value = name, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self.name] = self._value
        yield request


class QueryAuth(httpx.Auth):
    """An API key as a query parameter (kept out of stored tokens and error messages)."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self._value = name, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.url = request.url.copy_set_param(self.name, self._value)
        yield request


class ClientCredentials(httpx.Auth):
    """OAuth2 client credentials: one token shared by every partition of a run, fetched
    on first use, refreshed `refresh_before` seconds ahead of expiry and once on a 401."""

    def __init__(self, spec: cfg.OAuth2ClientCredentials, timeout: float) -> None:
        self.spec = spec
        self._secret = reveal(spec.client_secret)
        self._token: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()
        self._timeout = timeout
        self.fetched = 0

    def _fetch(self) -> None:
        data = {"grant_type": "client_credentials", "client_id": self.spec.client_id,
                "client_secret": self._secret}  # fmt: skip
        if self.spec.scope:
            data["scope"] = self.spec.scope
        try:
            response = httpx.post(self.spec.token_url, data=data, timeout=self._timeout)
        except httpx.TransportError as e:
            raise HTTPError(
                f"OAuth2 token request failed: {type(e).__name__}", url=self.spec.token_url
            ) from None
        if response.status_code != 200:
            raise HTTPError(
                f"OAuth2 token request answered HTTP {response.status_code}",
                url=self.spec.token_url,
                transient=response.status_code >= 500,
            )
        body = response.json()
        self._token = body["access_token"]
        self._expires = time.monotonic() + float(body.get("expires_in", 3600))
        self.fetched += 1

    @property
    def token(self) -> str | None:
        """The access token in use (None before the first request): a secret too."""
        return self._token

    def _current(self, stale: str | None = None) -> str:
        with self._lock:
            expiring = time.monotonic() >= self._expires - self.spec.refresh_before
            # Refresh unless another thread already replaced the token that got the 401.
            if self._token is None or expiring or (stale is not None and self._token == stale):
                self._fetch()
            assert self._token is not None
            return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._current()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._current(stale=token)}"
            yield request


def make_auth(spec: cfg.Auth | None, timeout: float = 30) -> httpx.Auth | None:
    """The httpx Auth for a source's `auth:` config."""
    if spec is None:
        return None
    if isinstance(spec, cfg.BearerAuth):
        return HeaderAuth("Authorization", f"Bearer {reveal(spec.token)}")
    if isinstance(spec, cfg.BasicAuth):
        return httpx.BasicAuth(spec.username, reveal(spec.password))
    if isinstance(spec, cfg.ApiKeyAuth):
        value = reveal(spec.value)
        return (
            QueryAuth(spec.name, value)
            if spec.location == "query"
            else HeaderAuth(spec.name, value)
        )
    return ClientCredentials(spec, timeout)


def secret_values(spec: cfg.Auth | None) -> list[str]:
    """The credentials of an auth config as they can appear in text: each secret value, its
    URL-encoded form, and a basic auth header's encoding. APIs quote requests back (next
    links, error bodies), so these are hidden wherever a source's words are shown."""
    if spec is None:
        return []
    values = [v.get_secret_value() for _, v in spec if isinstance(v, SecretStr)]
    if isinstance(spec, cfg.BasicAuth) and isinstance(spec.password, SecretStr):
        pair = f"{spec.username}:{spec.password.get_secret_value()}"
        values.append(base64.b64encode(pair.encode()).decode())
    encoded = [
        form
        for v in values
        for form in (quote(v, safe=""), quote(v), quote_plus(v), quote_plus(v, safe="*:/"))
    ]  # as httpx, browsers and redact_url write them
    return sorted({v for v in values + encoded if v}, key=len, reverse=True)


def secret_param(spec: cfg.Auth | None) -> str | None:
    """The query parameter that carries a credential, if any."""
    if isinstance(spec, cfg.ApiKeyAuth) and spec.location == "query":
        return spec.name
    return None
