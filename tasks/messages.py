"""What the dashboard says about a checkpoint: page state messages and partition log lines.

A page task run's final state message is the one place the UI shows what that page did
to the checkpoint, so it says what was committed (or honestly that nothing was yet), at
which cursor and on which attempt; a partition's two log lines say where it started and
how it ended. Plain functions of counts and cursors: no request URL ever goes in (cursor
values are the records' own data, shortened).
"""

from __future__ import annotations

from typing import Any

from pagesync.core.config import Checkpoint
from pagesync.core.engine import PageResult, PartitionOutcome

#: A cursor longer than this is cut: it is a hint for people, the store holds the value.
CURSOR_CHARS = 80


def cursor_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= CURSOR_CHARS else text[: CURSOR_CHARS - 1] + "…"


def _n(count: int, what: str) -> str:
    return f"{count:,} {what}" + ("" if count == 1 else "s")


def checkpoint_policy(policy: Checkpoint) -> str:
    """`every 5 pages`, `every 1,000 records or 30 s`: when a stream commits."""
    parts = []
    if policy.every_pages:
        parts.append(f"every {_n(policy.every_pages, 'page')}")
    if policy.every_records:
        parts.append(f"every {_n(policy.every_records, 'record')}")
    if policy.every_seconds:
        parts.append(f"every {policy.every_seconds:g} s")
    return " or ".join(parts) or "every page"


def page_message(
    result: PageResult,
    *,
    committed_pages: int,
    committed_records: int,
    attempt: int,
    attempts: int,
    policy: Checkpoint,
) -> str:
    """A finished page's state message.

    `committed_pages`/`committed_records` are what the checkpoint this page made covers
    (more than the page itself when the stream commits every N pages)."""
    if result.committed:
        what = f"committed {_n(committed_records, 'record')}"
        if committed_pages > 1:
            what += f" of pages {result.page - committed_pages + 1}-{result.page}"
    else:
        what = (
            f"{_n(result.records, 'record')} read, not committed yet "
            f"(checkpoint {checkpoint_policy(policy)})"
        )
    if attempt > 1:
        what += f" on attempt {attempt} of {attempts}"
    parts = [what]
    if result.cursor is not None:
        parts.append(f"cursor {cursor_text(result.cursor)}")
    parts.append(f"page {result.page}")
    if result.done:
        parts.append("partition complete")
    return " · ".join(parts)


def failed_message(page: int, resumes_at: int, error: BaseException) -> str:
    """A failed or interrupted page's state message: what was kept and where a run resumes."""
    kept = f"nothing committed; partition resumes at page {resumes_at}"
    if resumes_at < page:
        span = f"page {resumes_at}" if resumes_at == page - 1 else f"pages {resumes_at}-{page - 1}"
        kept += f" ({span} read since the last checkpoint rolled back too)"
    text = str(error)
    return f"{kept} · {type(error).__name__}" + (f": {text}" if text else "")


def partition_started(
    resumed_from: str | None, next_page: int, pages: int, records: int, resume: Any
) -> str:
    """The partition's first log line: where it starts, and from what.

    `resumed_from` is the engine's word for it (None, `restart`, `cursor ...`, `page N
    (stored token)`); `resume` the cursor value the first request filters from."""
    since = f", cursor {cursor_text(resume)}" if resume is not None else ""
    if resumed_from is None:
        return f"fresh: from page 1{since}"
    if resumed_from == "restart":
        return f"restarted from page 1{since}: no safe resume point (records out of cursor order)"
    before = f"{_n(pages, 'page')}, {_n(records, 'record')} committed before"
    if next_page <= 1:
        return f"new pass from page 1{since} (complete before: {before})"
    how = since or ", stored page token"
    return f"resumed from page {next_page}{how} ({before})"


def partition_ended(outcome: PartitionOutcome, seconds: float, resumes_at: int | None) -> str:
    """The partition's last log line: what this run did, in how long."""
    if outcome.skipped:
        return "skipped: complete"
    line = (
        f"{outcome.status}: {_n(outcome.new_pages, 'page')}, "
        f"{_n(outcome.new_records, 'record')} committed in this run, "
        f"{_n(outcome.rejected, 'rejected record')}, {seconds:.1f} s "
        f"(partition total: {_n(outcome.pages, 'page')}, {_n(outcome.records, 'record')})"
    )
    if outcome.status != "complete" and resumes_at is not None:
        line += f"; the next run resumes at page {resumes_at}"
    return line
