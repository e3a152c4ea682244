"""What differs between the databases pagesync writes to: SQLite, PostgreSQL, DuckDB and
MySQL/MariaDB. Everything else is the same SQL, run on the driver's cursor.

The differences are few and fixed, so they live here as data and small functions instead
of `if dialect == ...` spread over the store and the destination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

MYSQL = frozenset({"mysql", "mariadb"})

#: Databases with one writer at a time per file: this process queues its writers on a lock.
SINGLE_WRITER = frozenset({"sqlite", "duckdb"})

#: MySQL/MariaDB commit the open transaction before any DDL (CREATE, ALTER): schema
#: changes there are made before a checkpoint's first row, never between its rows.
DDL_COMMITS = MYSQL

#: The longest text primary key a MySQL/MariaDB destination keeps, in characters: InnoDB
#: keys are at most 3072 bytes, 4 bytes a character in utf8mb4, so three text key columns
#: of 255 fit. Longer values are refused with an error naming the stream and the field.
MYSQL_KEY_CHARS = 255


#: MySQL/MariaDB refuse table and column names longer than this (in characters).
MYSQL_NAME_CHARS = 64


def too_long(dialect: str, name: str) -> str | None:
    """Why `name` cannot name a table or column there, None when it can. pagesync does not
    shorten names (a shortened name is one nobody would find): it says which and where."""
    if dialect in MYSQL and len(name) > MYSQL_NAME_CHARS:
        return (
            f"{name!r} is {len(name)} characters; MySQL/MariaDB names hold at most "
            f"{MYSQL_NAME_CHARS}"
        )
    return None


def is_mysql(dialect: str) -> bool:
    return dialect in MYSQL


def positional_mark(paramstyle: str) -> str:
    """The placeholder of a positional parameter on the driver's cursor."""
    return "?" if paramstyle in ("qmark", "numeric_dollar") else "%s"


def named_mark(paramstyle: str) -> Callable[[str], str]:
    """The placeholder of a named parameter on the driver's cursor (psycopg and PyMySQL
    bind %(name)s, DuckDB $name, sqlite3 :name whatever paramstyle it declares)."""
    if paramstyle == "pyformat":
        return lambda n: f"%({n})s"
    if paramstyle == "numeric_dollar":
        return lambda n: f"${n}"
    return lambda n: f":{n}"


def value_type(value: Any, dialect: str) -> str:
    """The column type pagesync creates for a value first seen in a new field."""
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INTEGER" if dialect == "sqlite" else "BIGINT"
    if isinstance(value, float):
        return float_type(dialect)
    if isinstance(value, (dict, list)):
        return "JSONB" if dialect == "postgresql" else "JSON"
    return text_type(dialect)


def text_type(dialect: str) -> str:
    """The type any value can be stored in as its text."""
    return "LONGTEXT" if dialect in MYSQL else "TEXT"


def key_type(sql_type: str, dialect: str, text_keys: int) -> str:
    """A primary-key column's type: MySQL/MariaDB index no unbounded text, so a text key
    is a VARCHAR sized so that all the key's text columns fit InnoDB's key limit."""
    if dialect in MYSQL and sql_type in ("LONGTEXT", "TEXT"):
        return f"VARCHAR({min(MYSQL_KEY_CHARS, 768 // max(text_keys, 1))})"
    return sql_type


def float_type(dialect: str) -> str:
    """The type of a column holding fractions (and whole numbers)."""
    return {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION"}.get(dialect, "DOUBLE")


def base_type(sql_type: str) -> str:
    """`VARCHAR(255)` -> `VARCHAR`: a reflected type as the name pagesync compares."""
    return sql_type.split("(", 1)[0].strip().upper()


#: Databases written a page per statement, its columns as lists (`bulk_rows`): DuckDB runs
#: an executemany as one statement per row, about 4.5 ms a row (measured: 1,000 rows in
#: 4.5 s, against 12 ms as one INSERT ... SELECT unnest(?) of the page's columns).
COLUMNAR = frozenset({"duckdb"})


def bulk_rows(rows: list[list[Any]], pk_idx: list[int]) -> list[list[Any]]:
    """A page's rows as one list per column, for an upsert in one statement: a key twice
    in one statement is an error there, so the last row of a key wins, as it would have
    row by row."""
    kept = {tuple(row[i] for i in pk_idx): row for row in rows}.values() if pk_idx else rows
    return [list(column) for column in zip(*kept, strict=True)]


def upsert(dialect: str, table: str, cols: list[str], pk: list[str], quote: Any, mark: str) -> str:
    """INSERT that replaces the row with the same primary key: of one row (an executemany
    runs it per row), or of a whole page given as column lists on DuckDB. Without a key
    (an append table), a plain INSERT."""
    names = ", ".join(quote(c) for c in cols)
    if dialect in COLUMNAR:
        insert = (
            f"INSERT INTO {quote(table)} ({names}) "
            f"SELECT {', '.join(f'unnest({mark})' for _ in cols)}"
        )
    else:
        insert = f"INSERT INTO {quote(table)} ({names}) VALUES ({', '.join([mark] * len(cols))})"
    if not pk:
        return insert
    rest = [c for c in cols if c not in pk]
    if dialect in MYSQL:  # MariaDB has no `AS new` row alias; VALUES() is the portable form
        sets = ", ".join(f"{quote(c)} = VALUES({quote(c)})" for c in rest)
        return f"{insert} ON DUPLICATE KEY UPDATE {sets or f'{quote(pk[0])} = {quote(pk[0])}'}"
    sets = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in rest)
    action = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
    return f"{insert} ON CONFLICT ({', '.join(quote(k) for k in pk)}) {action}"


def retype(dialect: str, table: str, column: str, new_type: str, quote: Any) -> str:
    """ALTER a column to `new_type`, its values converted by the database."""
    if dialect in MYSQL:
        return f"ALTER TABLE {quote(table)} MODIFY COLUMN {quote(column)} {new_type}"
    return (
        f"ALTER TABLE {quote(table)} ALTER COLUMN {quote(column)} TYPE {new_type} "
        f"USING {quote(column)}::{new_type.lower()}"
    )


def table_columns(conn: Connection, name: str) -> dict[str, str] | None:
    """A table's columns (name -> type, in table order), None when there is no such table.

    DuckDB's SQLAlchemy dialect (duckdb-engine 0.17) reflects columns through PostgreSQL
    catalog tables DuckDB lacks, so DuckDB is asked through information_schema. MariaDB's
    JSON is LONGTEXT with a json_valid check: such columns are reported as JSON.
    """
    dialect = conn.dialect.name
    if dialect == "duckdb":
        found = conn.exec_driver_sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
            "AND table_schema = current_schema() ORDER BY ordinal_position",
            (name,),
        ).all()
        return {c: t for c, t in found} or None
    insp = inspect(conn)
    if not insp.has_table(name):
        return None
    cols = {c["name"]: str(c["type"]) for c in insp.get_columns(name)}
    if dialect in MYSQL:
        checks = conn.exec_driver_sql(
            "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
            "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (name,),
        ).all()
        for column, clause in checks:
            if column in cols and "json_valid" in clause.lower():
                cols[column] = "JSON"
    return cols


def rename_primary_key(conn: Connection, table: str, quote: Any) -> None:
    """PostgreSQL: name a renamed table's primary key `<table>_pkey`, as CREATE TABLE
    would. Its index is a relation of the schema: left with the staging table's name, the
    next refresh could not create its staging table."""
    name = conn.exec_driver_sql(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
        (quote(table),),
    ).scalar()
    wanted = f"{table}_pkey"[:63]
    if name is not None and name != wanted:
        conn.exec_driver_sql(
            f"ALTER TABLE {quote(table)} RENAME CONSTRAINT {quote(name)} TO {quote(wanted)}"
        )
