"""Destination tables: one per stream, upserted by primary key, widened as fields appear.

Top-level fields become typed columns (nested values are stored as JSON), and every row
carries `_pagesync_*` metadata columns. Identifiers come from the API, so they are always
quoted by the dialect's own preparer, never pasted into SQL.

APIs change a field's type over time (an id that was a number becomes a string). A value
a typed column cannot hold never fails the page: where the database would refuse it the
column becomes text (earlier values kept as their text), and the change is logged once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, event, inspect
from sqlalchemy.engine import Connection

from . import dialects
from . import records as records_
from .dbapi import run_on_driver
from .errors import ExtractError
from .store import write_lock

if TYPE_CHECKING:
    from .config import Nested

META_COLUMNS = ("_pagesync_partition", "_pagesync_page", "_pagesync_synced_at")
_FLOATS = frozenset({"REAL", "DOUBLE PRECISION", "DOUBLE"})
#: An append table's extra metadata column: which walk of the partition wrote the row, so a
#: resumed walk can take back exactly its own uncommitted or re-read rows.
LOAD = "_pagesync_load"

log = logging.getLogger("pagesync.destination")

_NUMBERS = frozenset({int, float})
_TEXT = frozenset({str})
#: What each column type pagesync creates holds as it is (by base type, `VARCHAR(255)` as
#: `VARCHAR`); other values are type drift. Other types (a table the user made) are left
#: to the database.
HOLDS: dict[str, frozenset[type]] = {
    "BIGINT": frozenset({int}), "INTEGER": frozenset({int}),
    "DOUBLE PRECISION": _NUMBERS, "DOUBLE": _NUMBERS, "REAL": _NUMBERS, "FLOAT": _NUMBERS,
    "BOOLEAN": frozenset({bool}), "TINYINT": frozenset({bool}),  # MariaDB's BOOLEAN
    "TEXT": _TEXT, "LONGTEXT": _TEXT, "VARCHAR": _TEXT,
    "JSON": frozenset({dict, list}), "JSONB": frozenset({dict, list}),
}  # fmt: skip
_NESTED = frozenset({dict, list})


def column_types(records: list[dict[str, Any]], names: list[str], dialect: str) -> dict[str, str]:
    """A type per new column from the page's values; a float anywhere makes it a float."""
    types: dict[str, str] = {}
    for name in names:
        text = chosen = dialects.text_type(dialect)
        for record in records:
            value = record.get(name)
            if value is None:
                continue
            t = dialects.value_type(value, dialect)
            if t in _FLOATS:
                chosen = t
                break
            if chosen == text:
                chosen = t
        types[name] = chosen
    return types


class Table:
    """What we know of one stream's table, so each page costs one executemany."""

    def __init__(
        self, name: str, primary_key: list[str], columns: dict[str, str], append: bool = False
    ) -> None:
        self.name = name
        self.primary_key = primary_key  # none: an append table, plain INSERTs
        self.meta = (*META_COLUMNS, LOAD) if append else META_COLUMNS
        self.columns = columns  # name -> SQL type, in table order, the metadata last
        self.sql: str | None = None
        self.pk_idx: list[int] = []
        self.json_idx: list[int] = []
        #: Per data column, what its type holds (HOLDS), None for types left to the database.
        self.holds: list[frozenset[type] | None] = []
        self.key_chars: dict[int, int] = {}


class Destination:
    """Writes pages of records into one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # Always quoted: SQLAlchemy's own rule leaves some SQLite keywords (`nothing`) bare.
        self.quote = engine.dialect.identifier_preparer.quote_identifier
        self.paramstyle = dialects.positional_mark(engine.dialect.paramstyle)
        self.text = dialects.text_type(self.dialect)
        self.tables: dict[str, Table] = {}
        self.reported: set[tuple[str, str]] = set()  # columns whose type change was logged
        self._rejected_ready: set[str] = set()  # MySQL: `<stream>__rejected` exists

    def _load(
        self, conn: Connection, name: str, primary_key: list[str], append: bool = False
    ) -> Table:
        table = self.tables.get(name)
        if table is None:
            meta = Table(name, primary_key, {}, append).meta
            cols: dict[str, str] = {}
            found = dialects.table_columns(conn, name)
            if found:
                if append and LOAD not in found:  # a merge table's stream now appends
                    self._forget_on_rollback(conn, name)
                    conn.exec_driver_sql(
                        f"ALTER TABLE {self.quote(name)} ADD COLUMN {self.quote(LOAD)} TEXT"
                    )
                cols = {c: t for c, t in found.items() if c not in meta}
                cols.update({m: "TEXT" for m in meta})
            table = self.tables[name] = Table(name, primary_key, cols, append)
        return table

    def _widen(self, conn: Connection, table: Table, records: list[dict[str, Any]]) -> None:
        """Create the table, or add columns for fields seen for the first time."""
        seen = set().union(*records) if records else set()
        missing = [f for f in sorted(seen) if f not in table.columns]
        if table.columns and not missing:
            return
        q = self.quote
        for key in table.primary_key:
            if not table.columns and key not in seen:
                raise ExtractError(
                    f"primary key field {key!r} is missing from the records", transient=False
                )
        for name in missing if table.columns else [table.name, *missing]:
            if why := dialects.too_long(self.dialect, name):
                what = "table" if name == table.name and not table.columns else "field"
                raise ExtractError(
                    f"{what} {why} (table {table.name}); rename it with a model, or choose "
                    "shorter names (stream, nested.child_tables, nested.flatten)",
                    transient=False,
                )
        types = column_types(records, missing, self.dialect)
        self._forget_on_rollback(conn, table.name)
        if not table.columns:
            pk_first = table.primary_key + [m for m in missing if m not in table.primary_key]
            text_keys = sum(types.get(k, self.text) == self.text for k in table.primary_key)
            for key in table.primary_key:
                types[key] = dialects.key_type(types.get(key, self.text), self.dialect, text_keys)
            defs = [f"{q(c)} {types.get(c, self.text)}" for c in pk_first]
            defs += [f"{q(m)} {'INTEGER' if m == '_pagesync_page' else 'TEXT'}" for m in table.meta]
            if table.primary_key:
                defs.append(f"PRIMARY KEY ({', '.join(q(k) for k in table.primary_key)})")
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {q(table.name)} ({', '.join(defs)})")
            table.columns = {c: types.get(c, self.text) for c in pk_first}
            table.columns.update({m: "TEXT" for m in table.meta})
        else:
            for name in missing:
                conn.exec_driver_sql(
                    f"ALTER TABLE {q(table.name)} ADD COLUMN {q(name)} {types[name]}"
                )
            # Our column order keeps the metadata last, whatever order the database has.
            data = {c: t for c, t in table.columns.items() if c not in table.meta}
            data.update(types)
            table.columns = {**data, **{m: "TEXT" for m in table.meta}}
        self._prepare(table)

    def _prepare(self, table: Table) -> None:
        cols = list(table.columns)
        table.sql = dialects.upsert(
            self.dialect, table.name, cols, table.primary_key, self.quote, self.paramstyle
        )
        table.pk_idx = [cols.index(k) for k in table.primary_key]
        bases = [dialects.base_type(table.columns[c]) for c in cols[: -len(table.meta)]]
        table.json_idx = [i for i, base in enumerate(bases) if base in ("JSON", "JSONB")]
        table.holds = [HOLDS.get(base) for base in bases]
        #: MySQL/MariaDB text keys are VARCHAR(n): their length, checked before the insert.
        table.key_chars = {
            i: int(t.split("(")[1].rstrip(")"))
            for i, t in ((i, table.columns[cols[i]].upper()) for i in table.pk_idx)
            if t.startswith("VARCHAR(") and self.dialect in dialects.MYSQL
        }

    def write(
        self,
        conn: Connection,
        stream: str,
        primary_key: list[str],
        records: list[dict[str, Any]],
        *,
        partition: str,
        page: int,
        nested: Nested | None = None,
        load: str | None = None,
    ) -> int:
        """Upsert one page of records inside the caller's transaction; returns the count.

        With `nested.child_tables`, each listed field's items go to `<stream>__<field>`, and
        a record's earlier items there are replaced in the same transaction. With `load`
        (an append stream: no primary key), rows are inserted and marked with the load."""
        if not records:
            return 0
        meta: tuple[Any, ...] = (partition, page, datetime.now(UTC).isoformat(timespec="seconds"))
        if load is not None:
            return self._upsert(conn, stream, [], records, (*meta, load), append=True)
        (name, key, parents), *children = self._parts(stream, primary_key, records, nested)
        count = self._upsert(conn, name, key, parents, meta)
        if children:
            owners = [[r.get(k) for k in primary_key] for r in records]
            for child, child_key, rows in children:
                self._forget_items(conn, child, child_key[:-1], owners)
                if rows:
                    self._upsert(conn, child, child_key, rows, meta)
        return count

    @staticmethod
    def _parts(
        stream: str, primary_key: list[str], records: list[dict[str, Any]], nested: Nested | None
    ) -> list[tuple[str, list[str], list[dict[str, Any]]]]:
        """The tables a page's records go to, each with its key and rows: the stream's own
        table first, then one per `nested.child_tables` field (rows may be none)."""
        if nested is None or not (nested.flatten or nested.child_tables):
            return [(stream, primary_key, records)]
        parents, children = records_.split(
            records, primary_key, nested.child_tables, nested.flatten
        )
        keys = [records_.parent_column(k) for k in primary_key]
        return [(stream, primary_key, parents)] + [
            (f"{stream}{records_.SEP}{field}", [*keys, records_.INDEX], rows)
            for field, rows in children.items()
        ]

    def _forget_items(
        self, conn: Connection, child: str, keys: list[str], owners: list[Any]
    ) -> None:
        """Delete the child rows of this page's records: their lists are replaced whole."""
        table = self._load(conn, child, [*keys, records_.INDEX])
        if not table.columns:
            return  # no table yet: nothing to replace
        q, mark = self.quote, self.paramstyle
        where = " AND ".join(f"{q(k)} = {mark}" for k in keys)
        run_on_driver(conn, f"DELETE FROM {q(child)} WHERE {where}", owners, many=True)

    def forget_load(
        self,
        conn: Connection,
        stream: str,
        partition: str,
        load: str,
        from_page: int,
        cursor: tuple[str, Any] | None = None,
    ) -> int:
        """Take back an append stream's rows that a resumed walk of the partition writes
        again: its pages from `from_page` on (written, never checkpointed), and with
        `cursor`, the rows at the resume cursor value, which the walk reads again."""
        table = self._load(conn, stream, [], append=True)
        if not table.columns:
            return 0  # nothing written yet
        q, mark = self.quote, self.paramstyle
        where = f"{q('_pagesync_page')} >= {mark}"
        params: list[Any] = [partition, load, from_page]
        if cursor is not None and cursor[0] in table.columns:
            where = f"({where} OR {q(cursor[0])} = {mark})"
            params.append(cursor[1])
        sql = (
            f"DELETE FROM {q(stream)} WHERE {q('_pagesync_partition')} = {mark} "
            f"AND {q(LOAD)} = {mark} AND {where}"
        )
        return int(conn.exec_driver_sql(sql, tuple(params)).rowcount or 0)

    def _upsert(
        self,
        conn: Connection,
        name: str,
        key: list[str],
        records: list[Any],
        meta: tuple[Any, ...],
        append: bool = False,
    ) -> int:
        """One table's part of a page: created or widened to fit, then one executemany."""
        table = self._load(conn, name, key, append)
        self._widen(conn, table, records)
        if table.sql is None:
            self._prepare(table)
        rows = self._rows(table, records, meta)
        self._fit(conn, table, rows)
        for idx in table.pk_idx:
            if any(row[idx] is None for row in rows):
                field = list(table.columns)[idx]
                raise ExtractError(f"a record has no primary key field {field!r}", transient=False)
        for idx, limit in table.key_chars.items():
            longest = max(len(str(row[idx])) for row in rows)
            if longest > limit:
                raise ExtractError(
                    f"stream {name}: primary key field {list(table.columns)[idx]!r} has a value "
                    f"of {longest} characters; this {self.dialect} table's key holds {limit} "
                    f"(VARCHAR({limit}), the most an InnoDB key allows)",
                    transient=False,
                )
        if self.dialect in dialects.COLUMNAR:
            run_on_driver(conn, table.sql, dialects.bulk_rows(rows, table.pk_idx))
        else:
            run_on_driver(conn, table.sql, rows, many=True)  # no per-row wrapping
        return len(rows)

    @staticmethod
    def _rows(
        table: Table, records: list[dict[str, Any]], meta: tuple[Any, ...]
    ) -> list[list[Any]]:
        """Records as rows in column order, nested values as JSON text.

        The hot path of a page: JSON columns are known from the table, so only their values
        are converted here; values of other types in a column are `_fit`'s.
        """
        fields = list(table.columns)[: -len(table.meta)]
        dumps, json_idx = orjson.dumps, table.json_idx
        rows = []
        append = rows.append
        for record in records:
            row = [*map(record.get, fields), *meta]
            for i in json_idx:
                v = row[i]
                if v is not None:
                    row[i] = dumps(v).decode()
            append(row)
        return rows

    def _fit(self, conn: Connection, table: Table, rows: list[list[Any]]) -> None:
        """Make the page's values fit their columns: each column's value types checked
        against what it holds (one set a column a page, in C), nested values outside JSON
        columns as JSON text, and a column the database would refuse a value in retyped."""
        for i, holds in enumerate(table.holds):
            if i in table.json_idx:
                continue  # any JSON value was written as JSON text
            found = set(map(type, [row[i] for row in rows]))
            found.discard(type(None))
            if holds is None or found <= holds:
                if found & _NESTED:  # a column of the user's own type
                    _dump_nested(rows, i)
                continue
            if found & _NESTED:
                _dump_nested(rows, i)
            self._retype(conn, table, list(table.columns)[i], found, holds)

    def _retype(
        self, conn: Connection, table: Table, name: str, found: set[type], holds: frozenset[type]
    ) -> None:
        """A column met values it does not hold. SQLite keeps any value in any column; the
        others refuse them, so the column becomes a float column (fractions in a
        whole-number column, not worth a warning) or a text one."""
        column_type = table.columns[name].upper()
        numbers_only = found <= _NUMBERS and holds <= _NUMBERS
        if numbers_only and self.dialect == "sqlite":
            return
        new_type: str | None = None
        if self.dialect != "sqlite":
            new_type = dialects.float_type(self.dialect) if numbers_only else self.text
            if name in table.primary_key:
                new_type = dialects.key_type(new_type, self.dialect, len(table.primary_key))
            if dialects.base_type(new_type) == dialects.base_type(column_type):
                new_type = column_type
            else:
                self._forget_on_rollback(conn, table.name)
                conn.exec_driver_sql(
                    dialects.retype(self.dialect, table.name, name, new_type, self.quote)
                )
                table.columns[name] = new_type
                self._prepare(table)
        if numbers_only or (table.name, name) in self.reported:
            return
        self.reported.add((table.name, name))
        kinds = ", ".join(sorted(t.__name__ for t in found - holds))
        log.warning(
            "%s.%s changed type: %s values in its %s column; %s",
            table.name, name, kinds, column_type,
            "kept as they came (SQLite holds any value in any column)" if new_type is None
            else "stored as their text" if new_type == column_type
            else f"the column is {new_type} now, earlier values kept as their text",
        )  # fmt: skip

    def write_rejected(
        self,
        conn: Connection,
        stream: str,
        rejected: list[tuple[dict[str, Any], str]],
        *,
        partition: str,
        page: int,
    ) -> None:
        """Records a stream's model refused, with why and where from, in `<stream>__rejected`."""
        q, mark = self.quote, self.paramstyle
        name = q(f"{stream}{records_.REJECTED}")
        if stream not in self._rejected_ready:
            self._rejected_table(conn, stream)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = [
            (partition, page, error, orjson.dumps(rec).decode(), now) for rec, error in rejected
        ]
        run_on_driver(conn, f"INSERT INTO {name} VALUES ({', '.join([mark] * 5)})", rows, many=True)

    def _rejected_table(self, conn: Connection, stream: str) -> None:
        q, text = self.quote, self.text
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {q(stream + records_.REJECTED)} ({q('partition')} {text}, "
            f"{q('page')} INTEGER, {q('error')} {text}, {q('record')} {text}, "
            f"{q('rejected_at')} {text})"
        )

    def prepare(
        self,
        conn: Connection,
        stream: str,
        primary_key: list[str],
        pages: list[tuple[list[dict[str, Any]], list[Any], int]],
        nested: Nested | None = None,
        append: bool = False,
        table: str | None = None,
    ) -> None:
        """Schema changes for the pages of one checkpoint (records, rejected records, page
        number each), made before the first row where DDL commits the open transaction
        (MySQL/MariaDB): so a checkpoint's rows and its state still commit together. Costs
        nothing on the other databases, whose DDL is part of the transaction. `table`: where
        the records go when not the stream's own table (a replace stream's staging table)."""
        if self.dialect not in dialects.DDL_COMMITS:
            return
        records = [r for page, _, _ in pages for r in page]
        parts = self._parts(table or stream, primary_key, records, nested) if records else []
        for i, (name, key, rows) in enumerate(parts):
            if rows:
                table = self._load(conn, name, key, append=append and i == 0)
                self._widen(conn, table, rows)
                self._fit(conn, table, self._rows(table, rows, (None,) * len(table.meta)))
        if any(rejected for _, rejected, _ in pages) and stream not in self._rejected_ready:
            self._rejected_table(conn, stream)
            self._rejected_ready.add(stream)  # DDL there is committed, whatever follows

    def _forget_on_rollback(self, conn: Connection, name: str) -> None:
        """DDL runs in the caller's transaction: if that rolls back, so does our knowledge."""
        event.listen(conn, "rollback", lambda _conn: self.tables.pop(name, None), once=True)

    # -- replace: a staging table swapped in whole ----------------------------------------

    def drop(self, names: list[str]) -> None:
        """Drop these tables where they exist (an abandoned refresh's staging tables)."""
        with write_lock(self.engine), self.engine.begin() as conn:
            for name in names:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.quote(name)}")
                self.tables.pop(name, None)

    def swap(self, pairs: list[tuple[str, str]]) -> bool:
        """Replace each live table by its staging table (`(staging, live)` pairs, the
        stream's table first, then its child tables), all at once: readers see the old
        tables or the new ones, never a mix. False when there is no staging table of the
        stream's own (a refresh that found no record): the live tables are kept as they are.

        A child table with no staging table (no record had items) is emptied. PostgreSQL,
        SQLite and DuckDB do it all in one transaction; MariaDB in one `RENAME TABLE`, which
        is atomic there (its DDL commits any transaction).
        """
        with write_lock(self.engine), self.engine.begin() as conn:
            have = {n for pair in pairs for n in pair if dialects.table_columns(conn, n)}
            if pairs[0][0] not in have:
                return False
            for name in (n for pair in pairs for n in pair):
                self.tables.pop(name, None)
            if self.dialect in dialects.MYSQL:
                self._rename_mysql(conn, pairs, have)
            else:
                self._rename_in_transaction(conn, pairs, have)
        return True

    def _rename_in_transaction(
        self, conn: Connection, pairs: list[tuple[str, str]], have: set[str]
    ) -> None:
        q = self.quote
        for staging, live in pairs:
            if staging not in have:
                if live in have:
                    conn.exec_driver_sql(f"DELETE FROM {q(live)}")
                continue
            if live in have:
                conn.exec_driver_sql(f"DROP TABLE {q(live)}")
            conn.exec_driver_sql(f"ALTER TABLE {q(staging)} RENAME TO {q(live)}")
            if self.dialect == "postgresql":  # the key's index keeps the staging table's name
                dialects.rename_primary_key(conn, live, q)

    def _rename_mysql(self, conn: Connection, pairs: list[tuple[str, str]], have: set[str]) -> None:
        q = self.quote
        renames: list[str] = []
        old: list[str] = []
        for staging, live in pairs:
            if staging not in have:
                if live not in have:
                    continue
                conn.exec_driver_sql(f"CREATE TABLE {q(staging)} LIKE {q(live)}")
            if live in have:
                gone = f"{live}{records_.STAGING}_old"
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {q(gone)}")
                renames.append(f"{q(live)} TO {q(gone)}")
                old.append(gone)
            renames.append(f"{q(staging)} TO {q(live)}")
        conn.exec_driver_sql(f"RENAME TABLE {', '.join(renames)}")
        for gone in old:
            conn.exec_driver_sql(f"DROP TABLE {q(gone)}")

    def column_values(self, stream: str, column: str) -> list[Any]:
        """Distinct values of one column (a parent stream's keys), in primary-key order."""
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(stream):
                return []
            q = self.quote
            sql = f"SELECT DISTINCT {q(column)} FROM {q(stream)} ORDER BY {q(column)}"
            return list(conn.exec_driver_sql(sql).scalars())

    def count(self, stream: str) -> int:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(stream):
                return 0
            return conn.exec_driver_sql(f"SELECT COUNT(*) FROM {self.quote(stream)}").scalar() or 0


def _dump_nested(rows: list[list[Any]], i: int) -> None:
    """Column `i`'s objects and lists as JSON text, in place."""
    dumps = orjson.dumps
    for row in rows:
        if type(row[i]) in _NESTED:
            row[i] = dumps(row[i]).decode()
