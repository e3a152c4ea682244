"""Destination tables on SQLite, DuckDB, a real PostgreSQL and a real MariaDB: typed columns, upserts by primary key,
columns added as fields appear, nested values as JSON, and hostile field names kept as data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import database_url
from sqlalchemy import Engine, inspect

from pagesync.core.config import Nested
from pagesync.core.destination import META_COLUMNS, Destination
from pagesync.core.dialects import DDL_COMMITS, table_columns
from pagesync.core.errors import ExtractError
from pagesync.core.store import _ENGINES, engine_for

HOSTILE = 'x"; DROP TABLE items; --'
SPACES = 'it\'s a "quoted" name'


@pytest.fixture(params=["sqlite", "postgresql", "duckdb", "mariadb"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param in ("sqlite", "duckdb"):
        url = database_url(request.param, request, tmp_path, "dest")
        yield engine_for(url)
        _ENGINES.pop(url).dispose()
    else:
        yield engine_for(database_url(request.param.replace("ql", ""), request, tmp_path))


def write(
    dest: Destination,
    records: list[dict[str, Any]],
    *,
    page: int = 1,
    stream: str = "items",
    pk: list[str] | None = None,
    partition: str = "p",
    nested: Nested | None = None,
) -> int:
    with dest.engine.begin() as conn:
        return dest.write(
            conn, stream, pk or ["id"], records, partition=partition, page=page, nested=nested
        )


def rows(engine: Engine, table: str = "items", order: str = "id") -> list[dict[str, Any]]:
    q = engine.dialect.identifier_preparer.quote
    with engine.connect() as conn:
        result = conn.exec_driver_sql(f"SELECT * FROM {q(table)} ORDER BY {q(order)}")
        return [dict(r) for r in result.mappings()]


def columns(engine: Engine, table: str = "items") -> dict[str, str]:
    with engine.connect() as conn:  # not SQLAlchemy's inspector: duckdb-engine's fails
        return {c: t.upper() for c, t in (table_columns(conn, table) or {}).items()}


FLOATS = ("REAL", "DOUBLE PRECISION", "DOUBLE")


def primary_key(engine: Engine, table: str = "items") -> list[str]:
    if engine.dialect.name == "duckdb":  # duckdb-engine's inspector cannot say
        with engine.connect() as conn:
            sql = (
                "SELECT constraint_column_names FROM duckdb_constraints() "
                "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'"
            )
            return list(conn.exec_driver_sql(sql, (table,)).scalar_one())
    return inspect(engine).get_pk_constraint(table)["constrained_columns"]


def as_json(value: Any) -> Any:
    """JSON columns come back as text (SQLite) or already parsed (PostgreSQL JSONB)."""
    return orjson.loads(value) if isinstance(value, str) else value


# -- the table ---------------------------------------------------------------------------------


def test_first_page_creates_typed_table_with_metadata(engine: Engine) -> None:
    dest = Destination(engine)
    record = {
        "id": 7,
        "name": "red falcon",
        "price": 12.5,
        "active": True,
        "attrs": {"color": "red"},
        "tags": ["a", "b"],
        "empty": None,
    }
    assert not inspect(engine).has_table("items")
    assert write(dest, [record], partition="2024-01-03", page=4) == 1

    cols = columns(engine)
    # As each engine names them: DuckDB's TEXT is VARCHAR; MariaDB's BOOLEAN is TINYINT(1),
    # its text LONGTEXT (TEXT holds 64 KB), its JSON LONGTEXT with a json_valid check.
    kind = engine.dialect.name
    text = {"duckdb": "VARCHAR", "mysql": "LONGTEXT"}.get(kind, "TEXT")
    meta_text = "VARCHAR" if kind == "duckdb" else "TEXT"
    expected = {
        "id": "INTEGER" if kind == "sqlite" else "BIGINT",
        "name": text,
        "price": {"sqlite": "REAL", "postgresql": "DOUBLE PRECISION"}.get(kind, "DOUBLE"),
        "active": "TINYINT" if kind == "mysql" else "BOOLEAN",
        "attrs": "JSONB" if kind == "postgresql" else "JSON",
        "tags": "JSONB" if kind == "postgresql" else "JSON",
        "empty": text,
        "_pagesync_partition": meta_text,
        "_pagesync_page": "INTEGER",
        "_pagesync_synced_at": meta_text,
    }
    assert cols == expected
    assert list(cols)[0] == "id"  # the primary key first
    assert list(cols)[-3:] == list(META_COLUMNS)
    assert primary_key(engine) == ["id"]

    (row,) = rows(engine)
    assert row["id"] == 7
    assert row["name"] == "red falcon"
    assert row["price"] == 12.5
    assert bool(row["active"]) is True
    assert row["empty"] is None
    assert row["_pagesync_partition"] == "2024-01-03"
    assert row["_pagesync_page"] == 4
    assert datetime.fromisoformat(row["_pagesync_synced_at"]).tzinfo is not None


def test_a_float_anywhere_on_the_page_makes_a_float_column(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{"id": 1, "price": 10, "flag": None}, {"id": 2, "price": 10.5, "flag": False}])
    cols = columns(engine)
    assert cols["price"] in FLOATS
    assert cols["flag"] == ("TINYINT" if engine.dialect.name == "mysql" else "BOOLEAN")
    assert [r["price"] for r in rows(engine)] == [10, 10.5]


def test_empty_page_writes_nothing_and_creates_nothing(engine: Engine) -> None:
    dest = Destination(engine)
    assert write(dest, []) == 0
    assert not inspect(engine).has_table("items")
    assert dest.count("items") == 0
    assert dest.column_values("items", "id") == []


# -- upserts -------------------------------------------------------------------------------------


def test_upsert_by_primary_key_replaces(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}], page=1)
    write(dest, [{"id": 2, "name": "TWO"}, {"id": 3, "name": "three"}], page=2)
    write(dest, [{"id": 2, "name": "TWO"}, {"id": 3, "name": "three"}], page=2)  # a replay
    got = [(r["id"], r["name"], r["_pagesync_page"]) for r in rows(engine)]
    assert got == [(1, "one", 1), (2, "TWO", 2), (3, "three", 2)]
    assert dest.count("items") == 3


def test_upsert_with_composite_primary_key(engine: Engine) -> None:
    dest = Destination(engine)
    pk = ["category", "id"]
    write(
        dest,
        [{"category": "books", "id": 1, "n": 1}, {"category": "games", "id": 1, "n": 2}],
        pk=pk,
    )
    write(
        dest,
        [{"category": "games", "id": 1, "n": 20}, {"category": "games", "id": 2, "n": 3}],
        pk=pk,
        page=2,
    )
    assert primary_key(engine) == pk
    got = sorted((r["category"], r["id"], r["n"]) for r in rows(engine))
    assert got == [("books", 1, 1), ("games", 1, 20), ("games", 2, 3)]


def test_primary_key_only_records(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{"id": 1}, {"id": 2}])
    write(dest, [{"id": 2}], page=2)
    assert [(r["id"], r["_pagesync_page"]) for r in rows(engine)] == [(1, 1), (2, 2)]


# -- schema evolution -------------------------------------------------------------------------


def test_new_field_on_later_page_adds_a_column(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{"id": 1, "name": "one"}])
    write(dest, [{"id": 2, "name": "two", "score": 3.5, "meta": {"k": [1]}}], page=2)
    cols = columns(engine)
    assert {"score", "meta"} <= set(cols)
    assert cols["score"] in FLOATS
    got = rows(engine)
    assert got[0]["score"] is None
    assert got[1]["score"] == 3.5
    assert as_json(got[1]["meta"]) == {"k": [1]}


def test_new_field_seen_by_a_fresh_destination(engine: Engine) -> None:
    """A new run knows nothing of the table yet: it reads it, then widens it."""
    write(Destination(engine), [{"id": 1, "name": "one"}])
    fresh = Destination(engine)
    write(fresh, [{"id": 1, "name": "uno", "lang": "it"}, {"id": 2, "name": "two"}], page=2)
    assert "lang" in columns(engine)
    got = [(r["id"], r["name"], r["lang"]) for r in rows(engine)]
    assert got == [(1, "uno", "it"), (2, "two", None)]
    assert fresh.count("items") == 2


def test_integer_column_keeps_later_fractional_values(engine: Engine) -> None:
    """A field that held whole numbers on page 1 must not round page 2's 10.5 away."""
    dest = Destination(engine)
    write(dest, [{"id": 1, "price": 10}])
    write(dest, [{"id": 2, "price": 10.5}, {"id": 3, "price": 0.25}], page=2)
    assert [r["price"] for r in rows(engine)] == [10, 10.5, 0.25]


@pytest.mark.parametrize(
    ("first", "later", "on_sqlite", "on_postgresql"),
    [
        # An id-like number that becomes a string: PostgreSQL refuses 'seven' in a BIGINT.
        (7, "seven", [7, "seven"], ["7", "seven"]),
        (1.5, "n/a", [1.5, "n/a"], ["1.5", "n/a"]),
        (True, "maybe", [1, "maybe"], ["true", "maybe"]),
        (7, True, [7, 1], ["7", "true"]),  # a bool where whole numbers were
        (7, {"v": 7}, [7, '{"v":7}'], ["7", '{"v":7}']),  # an object where a number was
        ("seven", 7, ["seven", "7"], ["seven", "7"]),  # a number in a text column: its text
    ],
)
def test_a_field_that_changes_type_keeps_every_value_and_is_reported_once(
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
    first: Any,
    later: Any,
    on_sqlite: list[Any],
    on_postgresql: list[Any],
) -> None:
    """An API whose field changes type must not fail its pages on a typed column: the
    column becomes text where the database would refuse the value (SQLite keeps any value
    in any column), every value is kept, earlier ones as their text, and one warning
    names the table, the column and the types."""
    dest = Destination(engine)
    write(dest, [{"id": 1, "v": first}])
    with caplog.at_level("WARNING", logger="pagesync"):
        write(dest, [{"id": 2, "v": later}], page=2)
        write(dest, [{"id": 3, "v": later}], page=3)  # the same drift again: not reported
    warnings = [r.getMessage() for r in caplog.records if "changed type" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "items.v" in warnings[0] and type(later).__name__ in warnings[0], warnings[0]
    write(Destination(engine), [{"id": 4, "v": later}], page=4)  # a new run's destination
    first_value, later_value = on_sqlite if engine.dialect.name == "sqlite" else on_postgresql
    if engine.dialect.name == "mysql":  # MariaDB's BOOLEAN is TINYINT(1): true's text is 1
        first_value, later_value = (v.replace("true", "1") for v in (first_value, later_value))
    assert [r["v"] for r in rows(engine)] == [first_value, *[later_value] * 3]


def test_rolled_back_first_page_leaves_the_destination_usable(engine: Engine) -> None:
    """The page's transaction can roll back (a lost lease, a failed checkpoint) after the
    table was created in it: the next page must still be written."""
    dest = Destination(engine)
    with pytest.raises(RuntimeError), dest.engine.begin() as conn:
        dest.write(conn, "items", ["id"], [{"id": 1, "name": "one"}], partition="p", page=1)
        raise RuntimeError("checkpoint refused")
    # The DDL rolled back with the page; MariaDB commits DDL as it runs: the table stays.
    assert inspect(engine).has_table("items") is (engine.dialect.name in DDL_COMMITS)
    write(dest, [{"id": 1, "name": "one"}])
    assert [(r["id"], r["name"]) for r in rows(engine)] == [(1, "one")]


def test_rolled_back_widening_leaves_the_destination_usable(engine: Engine) -> None:
    """Likewise for a column added in a transaction that rolled back."""
    dest = Destination(engine)
    write(dest, [{"id": 1, "name": "one"}])
    with pytest.raises(RuntimeError), dest.engine.begin() as conn:
        dest.write(conn, "items", ["id"], [{"id": 2, "extra": 1}], partition="p", page=2)
        raise RuntimeError("checkpoint refused")
    assert ("extra" in columns(engine)) is (engine.dialect.name in DDL_COMMITS)
    write(dest, [{"id": 2, "extra": 1}], page=2)
    assert [(r["id"], r["extra"]) for r in rows(engine)] == [(1, None), (2, 1)]


# -- values ----------------------------------------------------------------------------------------


def test_nested_values_stored_as_json_and_round_trip(engine: Engine) -> None:
    dest = Destination(engine)
    attrs = {"color": "grün", "dims": {"w": 1.5, "h": [1, 2, {"deep": None}]}, "ok": True}
    tags = ["new", "sale", {"weird": "\"quote'"}]
    write(dest, [{"id": 1, "attrs": attrs, "tags": tags}, {"id": 2, "attrs": {}, "tags": []}])
    got = rows(engine)
    assert as_json(got[0]["attrs"]) == attrs
    assert as_json(got[0]["tags"]) == tags
    assert as_json(got[1]["attrs"]) == {}
    assert as_json(got[1]["tags"]) == []
    if engine.dialect.name == "sqlite":
        assert isinstance(got[0]["attrs"], str)  # JSON text


def test_flattened_objects_are_columns_named_parent__child(engine: Engine) -> None:
    dest = Destination(engine)
    nested = Nested(flatten=True)
    write(dest, [{"id": 1, "ship": {"city": "Oslo", "geo": {"lat": 59.9}}, "tags": ["a"]}],
          nested=nested)  # fmt: skip
    write(dest, [{"id": 2, "ship": {"city": "Bergen", "zip": "5003"}}], page=2, nested=nested)
    got = rows(engine)
    assert [(r["id"], r["ship__city"], r["ship__geo__lat"], r["ship__zip"]) for r in got] == [
        (1, "Oslo", 59.9, None), (2, "Bergen", None, "5003")
    ]  # fmt: skip
    assert as_json(got[0]["tags"]) == ["a"]  # lists stay JSON unless split off
    assert "ship" not in columns(engine)


def test_child_tables_are_keyed_by_parent_and_index_and_replaced_with_their_parent(
    engine: Engine,
) -> None:
    """A record's list goes to `<stream>__<field>`; when the record comes again (an upsert),
    its items are replaced whole in the same transaction: a shorter list leaves no stale
    rows, and other records' items are untouched."""
    dest = Destination(engine)
    nested = Nested(child_tables=["lines", "tags"])
    orders = [
        {"id": 1, "total": 3, "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}],
         "tags": ["new"]},
        {"id": 2, "total": 5, "lines": [{"sku": "c", "qty": 5}], "tags": ["x", "y"]},
    ]  # fmt: skip
    assert write(dest, orders, nested=nested) == 2
    assert "lines" not in columns(engine) and "tags" not in columns(engine)
    again = {"id": 1, "total": 2, "lines": [{"sku": "b", "qty": 2}]}  # no tags any more
    write(Destination(engine), [again], page=2, nested=nested)
    lines = [(r["_parent_id"], r["_index"], r["sku"], r["qty"])
             for r in rows(engine, "items__lines", order="_parent_id")]  # fmt: skip
    assert sorted(lines) == [(1, 0, "b", 2), (2, 0, "c", 5)]
    tags = sorted(
        (r["_parent_id"], r["_index"], r["value"])
        for r in rows(engine, "items__tags", order="_parent_id")
    )
    assert tags == [(2, 0, "x"), (2, 1, "y")]
    assert [(r["id"], r["total"]) for r in rows(engine)] == [(1, 2), (2, 5)]
    lines_row = rows(engine, "items__lines", order="_parent_id")[0]
    assert lines_row["_pagesync_page"] in (1, 2) and lines_row["_pagesync_partition"] == "p"


def test_a_rolled_back_page_rolls_back_its_child_rows(engine: Engine) -> None:
    dest = Destination(engine)
    nested = Nested(child_tables=["lines"])
    write(dest, [{"id": 1, "lines": [{"sku": "a"}]}], nested=nested)
    with pytest.raises(RuntimeError), dest.engine.begin() as conn:
        page = [{"id": 1, "lines": [{"sku": "z"}, {"sku": "y"}]}]
        dest.write(conn, "items", ["id"], page, partition="p", page=2, nested=nested)
        raise RuntimeError("checkpoint refused")
    assert [r["sku"] for r in rows(engine, "items__lines", order="_index")] == ["a"]
    write(dest, [{"id": 1, "lines": [{"sku": "b"}]}], page=2, nested=nested)
    assert [r["sku"] for r in rows(engine, "items__lines", order="_index")] == ["b"]


def test_append_tables_insert_every_row_and_take_back_a_loads_rewritten_rows(
    engine: Engine,
) -> None:
    """An append table has no key: the same record twice is two rows. `forget_load` takes
    back one load's rows of one partition from a page on, or at a cursor value, and
    nothing of another load or partition."""
    dest = Destination(engine)

    def append(records: list[dict[str, Any]], page: int, load: str, partition: str = "p") -> None:
        with dest.engine.begin() as conn:
            dest.write(conn, "items", [], records, partition=partition, page=page, load=load)

    append([{"id": 1, "at": "t1"}, {"id": 1, "at": "t1"}], 1, "a")
    append([{"id": 2, "at": "t2"}], 2, "a")
    append([{"id": 3, "at": "t3"}], 3, "a")
    append([{"id": 3, "at": "t3"}], 3, "b")  # another walk
    append([{"id": 3, "at": "t3"}], 3, "a", partition="q")
    assert "_pagesync_load" in columns(engine)
    assert len(rows(engine)) == 6
    with dest.engine.begin() as conn:
        assert dest.forget_load(conn, "items", "p", "a", 3, ("at", "t2")) == 2
    left = sorted((r["id"], r["_pagesync_load"], r["_pagesync_partition"]) for r in rows(engine))
    assert left == [(1, "a", "p"), (1, "a", "p"), (3, "a", "q"), (3, "b", "p")]


def test_hostile_field_names_are_ordinary_columns(engine: Engine) -> None:
    dest = Destination(engine)
    record = {"id": 1, HOSTILE: "boom", SPACES: 2, "select": "kw", "Name": "upper"}
    write(dest, [record])
    write(dest, [{"id": 2, HOSTILE: "again", "from": "new kw"}], page=2)
    cols = columns(engine)
    assert {HOSTILE, SPACES, "select", "from", "Name"} <= set(cols)
    assert inspect(engine).has_table("items")
    got = rows(engine)
    assert len(got) == 2
    assert got[0][HOSTILE] == "boom"
    assert got[0][SPACES] == 2
    assert (got[0]["select"], got[0]["Name"]) == ("kw", "upper")
    assert got[1][HOSTILE] == "again"
    assert got[1]["from"] == "new kw"


KEYWORDS = ["nothing", "returning", "do", "filter", "window", "order", "group", "user", "limit"]


def test_sql_keywords_as_field_names(engine: Engine) -> None:
    """APIs send fields called `order`, `user` or `nothing`; each is just a column."""
    dest = Destination(engine)
    write(dest, [{"id": 1, **{k: f"v-{k}" for k in KEYWORDS}}])
    write(dest, [{"id": 1, **{k: f"w-{k}" for k in KEYWORDS}}], page=2)
    (row,) = rows(engine)
    assert {k: row[k] for k in KEYWORDS} == {k: f"w-{k}" for k in KEYWORDS}


def test_hostile_stream_name_is_an_ordinary_table(engine: Engine) -> None:
    dest = Destination(engine)
    name = 'orders"; DROP TABLE items; --'
    write(dest, [{"id": 1}], stream="items")
    write(dest, [{"id": 1}, {"id": 2}], stream=name)
    assert dest.count(name) == 2
    assert dest.count("items") == 1
    assert dest.column_values(name, "id") == [1, 2]


def test_hostile_primary_key_name(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{HOSTILE: 1, "v": "a"}], pk=[HOSTILE])
    write(dest, [{HOSTILE: 1, "v": "b"}], pk=[HOSTILE], page=2)
    assert [(r[HOSTILE], r["v"]) for r in rows(engine, order=HOSTILE)] == [(1, "b")]


# -- primary key missing ----------------------------------------------------------------------


def test_first_page_without_primary_key_is_an_error(engine: Engine) -> None:
    dest = Destination(engine)
    with pytest.raises(ExtractError, match="'id'") as info:
        write(dest, [{"name": "no id"}])
    assert info.value.transient is False
    assert not inspect(engine).has_table("items")


@pytest.mark.parametrize("bad", [{"name": "no id"}, {"id": None, "name": "null id"}])
def test_later_record_without_primary_key_is_an_error(engine: Engine, bad: dict[str, Any]) -> None:
    dest = Destination(engine)
    write(dest, [{"id": 1, "name": "one"}])
    with pytest.raises(ExtractError, match="'id'") as info:
        write(dest, [{"id": 2, "name": "two"}, bad], page=2)
    assert info.value.transient is False
    assert [r["id"] for r in rows(engine)] == [1]  # nothing of the bad page was written


def test_rejected_first_page_leaves_the_table_usable_for_other_partitions(engine: Engine) -> None:
    """Partition a's first page has a record without its key: that page fails, and
    partition b (same stream, same run, same Destination) must still be written."""
    dest = Destination(engine)
    with pytest.raises(ExtractError):
        write(dest, [{"id": 1, "name": "one"}, {"name": "no id"}], partition="a")
    write(dest, [{"id": 2, "name": "two"}], partition="b")
    assert [(r["id"], r["_pagesync_partition"]) for r in rows(engine)] == [(2, "b")]


def test_composite_key_part_missing_is_an_error(engine: Engine) -> None:
    dest = Destination(engine)
    with pytest.raises(ExtractError, match="'category'"):
        write(dest, [{"category": "books", "id": 1}, {"id": 2}], pk=["category", "id"])


# -- reading back ----------------------------------------------------------------------------------


def test_column_values_and_count(engine: Engine) -> None:
    dest = Destination(engine)
    write(dest, [{"id": i, "customer_id": i % 3} for i in range(1, 8)])
    assert dest.count("items") == 7
    assert dest.column_values("items", "customer_id") == [0, 1, 2]
    assert dest.count("absent") == 0
    assert dest.column_values("absent", "id") == []


def test_a_key_twice_in_one_page_keeps_the_last(engine: Engine) -> None:
    """As row by row: DuckDB writes a page in one statement, where a key may not repeat."""
    dest = Destination(engine)
    page = [{"id": 1, "name": "first"}, {"id": 2, "name": "two"}, {"id": 1, "name": "last"}]
    assert write(dest, page) == 3
    assert [(r["id"], r["name"]) for r in rows(engine)] == [(1, "last"), (2, "two")]
