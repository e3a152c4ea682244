"""The hand-written baseline pagesync is compared with, run as its own process.

httpx.Client GET a page -> orjson.loads -> executemany upsert (INSERT ... ON CONFLICT (id)
DO UPDATE) -> commit -> follow next_url. It writes the columns pagesync writes: the
records' top-level fields (nested values as JSON text) and pagesync's three `_pagesync_*`
metadata columns, typed as pagesync types them. SQLite gets pagesync's pragmas (WAL,
synchronous=NORMAL), so the comparison is of the work, not of the durability settings.

    python bench/raw_loop.py URL --sqlite FILE
    python bench/raw_loop.py URL --postgres CONNINFO --schema NAME
    python bench/raw_loop.py URL --duckdb FILE
    python bench/raw_loop.py URL --mysql mysql+pymysql://root@127.0.0.1:3306/DB

DuckDB's pages are explicit transactions (its connection otherwise commits every row), each
one INSERT ... SELECT unnest(?) of the page's columns (its executemany runs a statement per
row, some 400 times slower);
MariaDB's upsert is INSERT ... ON DUPLICATE KEY UPDATE, through PyMySQL as pagesync's.

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


def column_type(values: list[Any], db: str) -> str:
    """pagesync's rule: a float anywhere makes a float column, else the first value's type."""
    text = "LONGTEXT" if db == "mysql" else "TEXT"
    chosen = text
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            t = "BOOLEAN"
        elif isinstance(value, int):
            t = "INTEGER" if db == "sqlite" else "BIGINT"
        elif isinstance(value, float):
            return {"sqlite": "REAL", "postgres": "DOUBLE PRECISION"}.get(db, "DOUBLE")
        elif isinstance(value, (dict, list)):
            t = "JSONB" if db == "postgres" else "JSON"
        else:
            t = text
        if chosen == text:
            chosen = t
    return chosen


class Table:
    """The `items` table, created from the first page's fields (primary key `id` first)."""

    def __init__(self, records: list[dict[str, Any]], db: str) -> None:
        fields = sorted(set().union(*records) - {"id"})
        self.fields = ["id", *fields]
        q = "`" if db == "mysql" else '"'
        defs = [f"{q}{f}{q} {column_type([r.get(f) for r in records], db)}" for f in self.fields]
        defs += [
            f"{q}_pagesync_partition{q} TEXT",
            f"{q}_pagesync_page{q} INTEGER",
            f"{q}_pagesync_synced_at{q} TEXT",
        ]
        self.create = (
            f"CREATE TABLE IF NOT EXISTS items ({', '.join(defs)}, PRIMARY KEY ({q}id{q}))"
        )
        cols = [*self.fields, *META]
        names = ", ".join(f"{q}{c}{q}" for c in cols)
        marks = ", ".join(["%s" if db in ("postgres", "mysql") else "?"] * len(cols))
        insert = f"INSERT INTO items ({names}) VALUES ({marks})"
        if db == "duckdb":  # the page as column lists, one statement (executemany: a row each)
            insert = f"INSERT INTO items ({names}) SELECT {', '.join(['unnest(?)'] * len(cols))}"
        if db == "mysql":
            sets = ", ".join(f"`{c}` = VALUES(`{c}`)" for c in cols if c != "id")
            self.upsert = f"{insert} ON DUPLICATE KEY UPDATE {sets}"
        else:
            sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c != "id")
            self.upsert = f'{insert} ON CONFLICT ("id") DO UPDATE SET {sets}'

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


def connect(args: argparse.Namespace) -> tuple[Any, str]:
    """A DB-API connection and which database it is."""
    if args.sqlite:
        conn = sqlite3.connect(args.sqlite)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn, "sqlite"
    if args.duckdb:
        import duckdb

        return duckdb.connect(args.duckdb), "duckdb"
    if args.mysql:
        import pymysql
        from sqlalchemy.engine import make_url

        u = make_url(args.mysql)
        conn = pymysql.connect(host=u.host, port=u.port or 3306, user=u.username,
                               password=u.password or "", database=u.database, charset="utf8mb4")  # fmt: skip
        return conn, "mysql"
    import psycopg

    return psycopg.connect(args.postgres, options=f"-csearch_path={args.schema}"), "postgres"


def sync(url: str, conn: Any, db: str, max_pages: int | None) -> tuple[int, int]:
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
            # A DuckDB connection's cursor() is a new connection, outside its transaction.
            cur = conn if db == "duckdb" else conn.cursor()
            if db == "duckdb":
                conn.begin()
            if rows:
                if table is None:
                    table = Table(rows, db)
                    cur.execute(table.create)
                if db == "duckdb":
                    cur.execute(
                        table.upsert, [list(c) for c in zip(*table.rows(rows, pages), strict=True)]
                    )
                else:
                    cur.executemany(table.upsert, table.rows(rows, pages))
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
    where.add_argument("--duckdb", help="DuckDB file")
    where.add_argument("--mysql", help="mysql+pymysql:// URL of a MySQL/MariaDB database")
    parser.add_argument("--schema", default="public", help="PostgreSQL schema (search_path)")
    parser.add_argument("--max-pages", type=int, default=None)
    args = parser.parse_args(argv)
    conn, db = connect(args)
    try:
        pages, records = sync(args.url, conn, db, args.max_pages)
        last_commit = time.time()  # right after sync()'s last commit
    finally:
        conn.close()
    done = {"pages": pages, "records": records, "last_commit": last_commit}
    sys.stdout.write(orjson.dumps(done).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
