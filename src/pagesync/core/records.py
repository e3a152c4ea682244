"""Records reshaped for SQL before they are written: nested objects flattened into
`parent__child` fields, and lists split off into child tables (as dlt does), so nested
data is queryable with plain SQL when a JSON column is not what the user wants.

Pure functions: records in, records out. The records the engine tracks cursors and keys
on are never changed; reshaped records are new dicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Between a parent field's name and its child's in a flattened name (`address__city`).
SEP = "__"
#: A replace stream's staging table is `<stream>__pagesync_staging` (its child tables
#: `<stream>__pagesync_staging__<field>`), swapped in when the refresh is complete.
STAGING = "__pagesync_staging"
#: Records a stream's model refused go to `<stream>__rejected`.
REJECTED = "__rejected"
#: The child table's column holding an item's position in its list.
INDEX = "_index"
#: The child table's column holding a list item that is not an object.
VALUE = "value"


def parent_column(key: str) -> str:
    """A child table's column holding its parent record's primary key field `key`."""
    return f"_parent_{key}"


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """Nested objects as `parent__child` fields, at any depth; lists stay as they are."""
    if not any(type(v) is dict for v in record.values()):
        return record
    out: dict[str, Any] = {}
    _into(out, "", record)
    return out


def _into(out: dict[str, Any], prefix: str, obj: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if type(value) is dict and value:
            _into(out, name + SEP, value)
        else:
            out[name] = value


def split(
    records: list[dict[str, Any]],
    primary_key: list[str],
    fields: list[str],
    flat: bool,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The parent records without `fields`, and per field its child rows: the parent's key
    as `_parent_<key>`, the item's position as `_index`, then the item's fields (or the
    item as `value` when it is not an object). A missing or empty list gives no rows, and
    the caller still replaces the parent's earlier rows with none."""
    parents: list[dict[str, Any]] = []
    children: dict[str, list[dict[str, Any]]] = {f: [] for f in fields}
    keys = [(k, parent_column(k)) for k in primary_key]
    for record in records:
        parent = {k: v for k, v in record.items() if k not in children}
        parents.append(flatten(parent) if flat else parent)
        owner = {column: record.get(k) for k, column in keys}
        for field, rows in children.items():
            items = record.get(field)
            if not isinstance(items, list):
                items = [] if items is None else [items]
            for i, item in enumerate(items):
                body = item if type(item) is dict else {VALUE: item}
                rows.append({**(flatten(body) if flat else body), **owner, INDEX: i})
    return parents, children


def table_pairs(stream: str, child_tables: Iterable[str]) -> list[tuple[str, str]]:
    """(staging, live) for a stream's table and each of its child tables."""
    staging = f"{stream}{STAGING}"
    return [(staging, stream), *((f"{staging}{SEP}{f}", f"{stream}{SEP}{f}") for f in child_tables)]


def table_names(stream: str, child_tables: Iterable[str], *, replaces: bool) -> list[str]:
    """Every table a stream may write: its rejected records, its table and child tables,
    and their staging copies when it replaces them."""
    pairs = table_pairs(stream, child_tables)
    live = [t for _, t in pairs]
    staging = [s for s, _ in pairs] if replaces else []
    return [f"{stream}{REJECTED}", live[0], *staging[:1], *live[1:], *staging[1:]]
