"""Progress for people: a live table on a terminal, a one-line summary elsewhere."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..core.engine import PartitionOutcome


@dataclass
class _Row:
    pages: int = 0
    records: int = 0
    status: str = "running"
    started: float = field(default_factory=time.monotonic)


class Progress:
    """An engine Observer that draws what the partitions of a run are doing."""

    def __init__(self, console: Console, stream: str) -> None:
        self.console = console
        self.stream = stream
        self.rows: dict[str, _Row] = {}
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(None, None, None)

    def page_committed(self, stream: str, progress: PartitionOutcome) -> None:
        with self.lock:
            row = self.rows.setdefault(progress.partition, _Row())
            row.pages, row.records = progress.new_pages, progress.new_records
        if self.live is not None:
            self.live.update(self._table())

    def partition_done(self, stream: str, outcome: PartitionOutcome) -> None:
        with self.lock:
            row = self.rows.setdefault(outcome.partition, _Row())
            row.pages, row.records = outcome.new_pages, outcome.new_records
            row.status = "skipped (complete)" if outcome.skipped else outcome.status
        if self.live is not None:
            self.live.update(self._table())

    def _table(self) -> Table:
        table = Table(title=f"pagesync · {self.stream}", title_justify="left", expand=False)
        for col in ("partition", "status", "pages", "records", "records/s"):
            table.add_column(col, justify="right" if col not in ("partition", "status") else "left")
        with self.lock:
            rows = list(self.rows.items())
        shown = rows if len(rows) <= 20 else [r for r in rows if r[1].status == "running"][:20]
        for key, row in shown:
            rate = row.records / max(time.monotonic() - row.started, 1e-6)
            table.add_row(key, row.status, str(row.pages), str(row.records), f"{rate:,.0f}")
        if len(rows) > len(shown):
            done = sum(r.status != "running" for _, r in rows)
            table.caption = f"{len(rows)} partitions, {done} finished"
        return table

    def totals(self) -> tuple[int, int, int]:
        with self.lock:
            rows = list(self.rows.values())
        return len(rows), sum(r.pages for r in rows), sum(r.records for r in rows)
