"""Statements run straight on the driver's cursor, inside a SQLAlchemy transaction.

The per-page writes (records, page log, checkpoint) have fixed SQL text; going through
SQLAlchemy's expression layer each time costs more CPU than the rows themselves.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection


def run_on_driver(conn: Connection, sql: str, params: Any, *, many: bool = False) -> int:
    """Execute `sql` with `params` (a sequence of rows when `many`) on the driver's cursor
    of `conn`, in its transaction; the driver's rowcount."""
    cursor = conn.connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return int(cursor.rowcount)
    finally:
        cursor.close()
