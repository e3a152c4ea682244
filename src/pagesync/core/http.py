"""One HTTP request to a source: retries with backoff and jitter, Retry-After, a shared
rate limit, timeouts, and credentials sent only to the source's own origin.

httpx does the protocol work (pooling, redirects, timeouts); this module adds the
policy a sync needs on top of it and turns every failure into an HTTPError that
names the URL with its secrets removed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import httpx

from . import config as cfg
from .auth import ClientCredentials, make_auth, secret_param, secret_values
from .errors import HTTPError
from .paginators import PageRequest

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
SECRET_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "auth", "secret", "password",
     "client_secret", "signature", "sig", "code"}
)  # fmt: skip


def mask(text: str, values: Sequence[str]) -> str:
    """`text` with each of `values` (known credentials, longest first) replaced by ***."""
    for value in values:
        text = text.replace(value, "***")
    return text


def redact_url(url: str | httpx.URL, secret: str | None = None, values: Sequence[str] = ()) -> str:
    """The URL without userinfo and without the values of secret-looking query params
    (and of `secret`, the source's own credential parameter); any of `values` (known
    credentials) in the path or in another parameter's value is replaced by ***."""
    hidden = SECRET_PARAMS if secret is None else SECRET_PARAMS | {secret.lower()}
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    query = urlencode(
        [
            (k, "***" if k.lower() in hidden else mask(v, values))
            for k, v in parse_qsl(parts.query, True)
        ],
        safe="*:/",
    )
    path, plain = parts.path, unquote(parts.path)
    if (masked := mask(plain, values)) != plain:
        path = quote(masked, safe="/*")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    u = httpx.URL(str(url))
    return (u.scheme, u.host, u.port)


class RateLimiter:
    """Spaces requests evenly at `per_second`, across all the threads that share it."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class Limiter(Protocol):
    """What a source's requests wait on: this process's RateLimiter, or one shared by every
    worker (pagesync.prefect.ratelimit). `pause`, where a limiter has it, is told of a
    Retry-After, so every request behind the limiter waits, not only the one that got it."""

    def wait(self) -> None: ...


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header, given as seconds or as an HTTP date."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class SourceClient:
    """A pooled httpx client for one source, shared by every partition of a run."""

    def __init__(
        self,
        source: cfg.Source,
        *,
        limiter: Limiter | None = None,
        auth: httpx.Auth | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.source = source
        self.retry = source.retry
        self.limiter = limiter
        self.sleep = sleep
        self.origin = origin(source.base_url)
        self.secret_param = secret_param(source.auth)
        self.secrets = secret_values(source.auth)
        if auth is None:
            auth = make_auth(source.auth, source.timeout)
        limits = httpx.Limits(max_connections=source.concurrency * 2 + 2)
        self.client = httpx.Client(
            base_url=source.base_url,
            headers=source.headers,
            timeout=source.timeout,
            follow_redirects=True,
            max_redirects=10,
            limits=limits,
            auth=auth,
            transport=transport,
        )
        # A client without credentials, for next links the stream allows to leave the origin.
        self._foreign: httpx.Client | None = None

    def close(self) -> None:
        self.client.close()
        if self._foreign is not None:
            self._foreign.close()

    def redact(self, url: str | httpx.URL) -> str:
        """The URL as it may be shown: see redact_url; no credential of ours anywhere in it."""
        return redact_url(url, self.secret_param, self.credentials())

    def hide(self, text: str) -> str:
        """`text` with the source's credentials replaced by ***: an API may quote a request,
        key included, in an error body."""
        return mask(text, self.credentials())

    def credentials(self) -> list[str]:
        """The source's credentials in the forms text may hold them, an OAuth2 access token
        included once there is one."""
        auth = self.client.auth
        if isinstance(auth, ClientCredentials) and auth.token:
            return [auth.token, *self.secrets]
        return self.secrets

    def scrub(self, token: object) -> object:
        """A next-page URL without our credential parameter: it is stored in the state
        database, and the credential is added again to every request anyway."""
        if self.secret_param and isinstance(token, str) and "://" in token:
            return str(httpx.URL(token).copy_remove_param(self.secret_param))
        return token

    def _client_for(self, url: str) -> httpx.Client:
        if "://" not in url or origin(url) == self.origin:
            return self.client
        if not self.source.follow_foreign_next:
            raise HTTPError(
                f"next page is on another host ({self.redact(url)}); credentials are only sent "
                f"to {self.source.base_url} (set follow_foreign_next: true on the source to "
                "follow it without them)",
                transient=False,
            )
        if self._foreign is None:
            self._foreign = httpx.Client(
                timeout=self.source.timeout, follow_redirects=True, max_redirects=10
            )
        return self._foreign

    def _backoff(self, attempt: int) -> float:
        cap = min(self.retry.max_backoff, self.retry.backoff * 2**attempt)
        return cap / 2 + random.random() * cap / 2  # "equal jitter": never zero, never in step

    def get(self, req: PageRequest) -> httpx.Response:
        """The request with retries; returns a 2xx response (or one `req.accept` matches)
        with its body read, or raises HTTPError."""
        client = self._client_for(req.url)
        attempts = self.retry.attempts
        last: str = ""
        for attempt in range(attempts):
            if self.limiter is not None:
                self.limiter.wait()
            try:
                response = client.request(
                    req.method,
                    req.url,
                    params=req.params or None,
                    headers=req.headers or None,
                    json=req.json,
                )
            except httpx.TooManyRedirects:
                raise HTTPError(
                    "too many redirects (a redirect loop)",
                    url=self.redact(req.url),
                    transient=False,
                ) from None
            except httpx.TransportError as e:
                last = self.hide(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                url = self.redact(e.request.url) if _has_request(e) else self.redact(req.url)
                if attempt + 1 < attempts:
                    self.sleep(self._backoff(attempt))
                    continue
                raise HTTPError(f"{last} after {attempts} tries", url=url) from None
            status = response.status_code
            if status < 300 or any(m.matches(status, response.text) for m in req.accept):
                return _unlinked(response)
            url = self.redact(response.url)
            last = f"HTTP {status}"
            if status in RETRY_STATUSES and attempt + 1 < attempts:
                wait = retry_after(response)
                if wait is not None:
                    wait = min(wait, self.retry.max_backoff)
                    pause = getattr(self.limiter, "pause", None)
                    if pause is not None:
                        pause(wait)
                wait = self._backoff(attempt) if wait is None else wait
                self.sleep(wait)
                continue
            snippet = self.hide(response.text)[:200].strip().replace("\n", " ")
            transient = status in RETRY_STATUSES
            tries = f" after {attempts} tries" if transient else ""
            raise HTTPError(f"HTTP {status}{tries}: {snippet}", url=url, transient=transient)
        raise HTTPError(last or "no response", url=self.redact(req.url))  # pragma: no cover


def _unlinked(response: httpx.Response) -> httpx.Response:
    """The response, read, without its reference cycle (response -> httpx's stream wrapper
    -> response), so that it and its body are freed as soon as the page is done with them,
    not at the garbage collector's next pass (measured: a 1,000-record page's body each).
    The stream in its place serves the same bytes, as for a response built from content."""
    response.stream = httpx.ByteStream(response.content)
    return response


def _has_request(e: httpx.TransportError) -> bool:
    try:
        e.request  # noqa: B018 - raises when the error has no request attached
    except RuntimeError:
        return False
    return True
