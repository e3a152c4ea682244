"""Certificate authorities loaded when a TLS connection first needs them, not before.

Every httpx client and every Prefect API client builds an `ssl.SSLContext` when it is made
and loads certifi's 150-odd authorities into it: 16 to 25 ms each on the measured machine,
and a run makes seven such clients (Prefect's API client, its events and logs workers,
its concurrency service, the version check, pagesync's source client and its server
check), about 170 ms of a one-page run's 600 ms, for clients that mostly only ever speak
plain HTTP to the local Prefect server. `install()` makes `ssl.create_default_context`
return a context that loads its authorities the first time it is used for a connection
(`wrap_socket`, `wrap_bio`) or asked about them, and not at all if it never is. The
context is otherwise the one the standard library builds: same protocol, verify mode,
hostname check and key log, and verification is exactly as strict.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from typing import Any

_original = ssl.create_default_context
#: The standard library's function is copied below as it is in 3.11 to 3.13; later
#: versions keep their own until someone checks what they changed.
_KNOWN_UNTIL = (3, 14)


class LazyCAContext(ssl.SSLContext):
    """An `ssl.SSLContext` whose authorities are loaded at its first use."""

    _pagesync_load: tuple[str | None, ssl.Purpose] | None = None
    _pagesync_lock = threading.Lock()  # one for all: a load happens once per context

    def _load_authorities(self) -> None:
        if self._pagesync_load is None:
            return
        with self._pagesync_lock:
            pending, self._pagesync_load = self._pagesync_load, None
            if pending is None:
                return  # another thread loaded them
            cafile, purpose = pending
            if cafile:
                self.load_verify_locations(cafile)
            else:
                self.load_default_certs(purpose)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load_authorities()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load_authorities()
        return super().wrap_bio(*args, **kwargs)

    def get_ca_certs(self, binary_form: bool = False) -> Any:
        self._load_authorities()
        return super().get_ca_certs(binary_form)

    def cert_store_stats(self) -> dict[str, int]:
        self._load_authorities()
        return super().cert_store_stats()


def create_default_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
    *,
    cafile: str | None = None,
    capath: str | None = None,
    cadata: str | bytes | None = None,
) -> ssl.SSLContext:
    """`ssl.create_default_context`, with a client context's authorities loaded lazily.

    Anything else (a server context, a CA directory or data, a CA file that is not there,
    so that its error comes now) goes to the standard library's own function.
    """
    eager = capath or cadata or (cafile and not os.path.isfile(cafile))
    if purpose != ssl.Purpose.SERVER_AUTH or eager or sys.version_info >= _KNOWN_UNTIL:
        return _original(purpose, cafile=cafile, capath=capath, cadata=cadata)
    context = LazyCAContext(ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if sys.version_info >= (3, 13):  # as 3.13's own function sets them
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    context._pagesync_load = (cafile, purpose)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    return context


def install() -> None:
    """Make this process's TLS clients load their authorities on first use (idempotent)."""
    ssl.create_default_context = create_default_context  # type: ignore[assignment]
