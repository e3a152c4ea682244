"""The hand-written baseline pagesync is compared with, run as its own process.

httpx.Client GET a page -> orjson.loads -> executemany upsert (INSERT ... ON CONFLICT (id)
DO UPDATE) -> commit -> follow next_url. It writes the columns pagesync writes: the
records' top-level fields (nested values as JSON text) and pagesync's three `_pagesync_*`
metadata columns, typed as pagesync types them. SQLite gets pagesync's pragmas (WAL,
synchronous=NORMAL), so the comparison is of the work, not of the durability settings.

    python bench/raw_loop.py URL --sqlite FILE
    python bench/raw_loop.py URL --postgres CONNINFO --schema NAME

Prints one JSON line: {"pages": N, "records": M, "last_commit": UNIX_TIME}.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

META = ("_pagesync_partition", "_pagesync_page", "_pagesync_synced_at")
Row = tuple[Any, ...]


def column_type(values: list[Any], postgres: bool) -> str:
    """pagesync's rule: a float anywhere makes a float column, else the first value's type."""
    chosen = "TEXT"
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            t = "BOOLEAN"
        elif isinstance(value, int):
            t = "BIGINT" if postgres else "INTEGER"
        elif isinstance(value, float):
            return "DOUBLE PRECISION" if postgres else "REAL"
        elif isinstance(value, (dict, list)):
            t = "JSONB" if postgres else "JSON"
        else:
            t = "TEXT"
        if chosen == "TEXT":
            chosen = t
    return chosen


class Table:
    """The `items` table, created from the first page's fields (primary key `id` first)."""

    def __init__(self, records: list[dict[str, Any]], postgres: bool, mark: str) -> None:
        fields = sorted(set().union(*records) - {"id"})
        self.fields = ["id", *fields]
        defs = [f'"{f}" {column_type([r.get(f) for r in records], postgres)}' for f in self.fields]
        defs += [
            '"_pagesync_partition" TEXT',
            '"_pagesync_page" INTEGER',
            '"_pagesync_synced_at" TEXT',
        ]
        self.create = f'CREATE TABLE IF NOT EXISTS items ({", ".join(defs)}, PRIMARY KEY ("id"))'
        cols = [*self.fields, *META]
        names = ", ".join(f'"{c}"' for c in cols)
        sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c != "id")
        marks = ", ".join([mark] * len(cols))
        self.upsert = (
            f'INSERT INTO items ({names}) VALUES ({marks}) ON CONFLICT ("id") DO UPDATE SET {sets}'
        )

    def rows(self, records: list[dict[str, Any]], page: int) -> list[Row]:
        meta = ("", page, datetime.now(UTC).isoformat(timespec="seconds"))
        out = []
        for record in records:
            row = [record.get(f) for f in self.fields]
            for i, v in enumerate(row):
                if type(v) in (dict, list):
                    row[i] = orjson.dumps(v).decode()
            out.append((*row, *meta))
        return out


def connect(args: argparse.Namespace) -> tuple[Any, bool]:
    """A DB-API connection and whether it is PostgreSQL."""
    if args.sqlite:
        conn = sqlite3.connect(args.sqlite)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn, False
    import psycopg

    return psycopg.connect(args.postgres, options=f"-csearch_path={args.schema}"), True


def sync(url: str, conn: Any, postgres: bool, max_pages: int | None) -> tuple[int, int]:
    """Walk next_url from `url`, one committed transaction per page."""
    table: Table | None = None
    pages = records = 0
    next_url: str | None = url
    with httpx.Client(timeout=60) as client:
        while next_url and (max_pages is None or pages < max_pages):
            response = client.get(next_url)
            response.raise_for_status()
            body = orjson.loads(response.content)
            rows = body["rows"]
            pages += 1
            if rows:
                if table is None:
                    table = Table(rows, postgres, "%s" if postgres else "?")
                    conn.execute(table.create)
                conn.cursor().executemany(table.upsert, table.rows(rows, pages))
                records += len(rows)
            conn.commit()
            next_url = body.get("next_url")
    return pages, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the first page's URL")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", help="SQLite file")
    where.add_argument("--postgres", help="libpq conninfo or postgresql:// URL")
    parser.add_argument("--schema", default="public", help="PostgreSQL schema (search_path)")
    parser.add_argument("--max-pages", type=int, default=None)
    args = parser.parse_args(argv)
    conn, postgres = connect(args)
    try:
        pages, records = sync(args.url, conn, postgres, args.max_pages)
        last_commit = time.time()  # right after sync()'s last commit
    finally:
        conn.close()
    done = {"pages": pages, "records": records, "last_commit": last_commit}
    sys.stdout.write(orjson.dumps(done).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
