"""Errors that users can act on: each says what failed, where, and what was kept."""

from __future__ import annotations


class PagesyncError(Exception):
    """Base class for every error pagesync raises on purpose."""


class ConfigError(PagesyncError):
    """The config file is missing, unreadable or invalid.

    `where` names the file and the key path, so the message points at the line to fix.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        self.detail = message
        where = ", ".join(p for p in (file, f"at {key}" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class PageError(PagesyncError):
    """A page could not be fetched, parsed or written.

    Carries stream, partition, page number and a URL with secrets removed, and the
    last committed cursor, which is what a resume will start from.
    """

    #: Whether retrying the same request may succeed (network, 5xx, a truncated body).
    transient: bool = True

    def __init__(
        self,
        message: str,
        *,
        stream: str = "",
        partition: str = "",
        page: int | None = None,
        url: str | None = None,
        committed: object = None,
        transient: bool | None = None,
    ) -> None:
        self.reason = message
        self.stream = stream
        self.partition = partition
        self.page = page
        self.url = url
        self.committed = committed
        if transient is not None:
            self.transient = transient
        super().__init__(message)

    def located(self, *, stream: str, partition: str, page: int, committed: object) -> PageError:
        """Fill in where the error happened (the HTTP layer does not know)."""
        self.stream, self.partition, self.page, self.committed = stream, partition, page, committed
        return self

    def __str__(self) -> str:
        parts = []
        if self.stream:
            parts.append(f"stream {self.stream}")
        if self.partition:
            parts.append(f"partition {self.partition}")
        if self.page is not None:
            parts.append(f"page {self.page}")
        where = ", ".join(parts)
        text = f"{where}: {self.reason}" if where else self.reason
        if self.url:
            text += f" ({self.url})"
        if self.stream:
            text += f"; last committed cursor: {self.committed!r}"
        return text


class HTTPError(PageError):
    """The source answered with an error, or not at all, after all retries."""


class ExtractError(PageError):
    """The body was not JSON, or the records were not where the config says."""


class PaginationLoop(PageError):
    """The API sent back a next-page pointer it had already sent: it would never end."""

    transient = False


class LeaseLost(PagesyncError):
    """Another runner took this partition over; our late commit was refused and rolled back."""


class Stopped(PagesyncError):
    """The run was asked to stop (SIGTERM, Ctrl-C); what was committed stays."""

    transient = False


class StateError(PagesyncError):
    """Stored state is unreadable, of an unknown version, or an import file is malformed."""
