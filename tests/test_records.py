"""Records reshaped for SQL (core/records.py): flattening and child-table rows."""

from __future__ import annotations

from pagesync.core.records import flatten, split


def test_flatten_names_nested_fields_parent__child_at_any_depth() -> None:
    record = {"id": 1, "a": {"b": 2, "c": {"d": [1, 2], "e": None}}, "f": [{"g": 1}], "h": {}}
    assert flatten(record) == {"id": 1, "a__b": 2, "a__c__d": [1, 2], "a__c__e": None,
                               "f": [{"g": 1}], "h": {}}  # fmt: skip


def test_flatten_leaves_a_flat_record_as_it_is() -> None:
    record = {"id": 1, "tags": ["x"]}
    assert flatten(record) is record


def test_split_keys_each_item_by_its_parent_and_position() -> None:
    records = [
        {"id": 1, "region": "eu", "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}],
         "tags": ["x", "y"]},
        {"id": 2, "region": "us", "lines": [], "tags": None},
        {"id": 3, "region": "eu"},
    ]  # fmt: skip
    parents, children = split(records, ["id", "region"], ["lines", "tags"], flat=False)
    assert parents == [{"id": 1, "region": "eu"}, {"id": 2, "region": "us"},
                       {"id": 3, "region": "eu"}]  # fmt: skip
    assert children["lines"] == [
        {"sku": "a", "qty": 2, "_parent_id": 1, "_parent_region": "eu", "_index": 0},
        {"sku": "b", "qty": 1, "_parent_id": 1, "_parent_region": "eu", "_index": 1},
    ]
    assert children["tags"] == [
        {"value": "x", "_parent_id": 1, "_parent_region": "eu", "_index": 0},
        {"value": "y", "_parent_id": 1, "_parent_region": "eu", "_index": 1},
    ]
    assert "lines" in records[0]  # the engine's records are never changed


def test_split_keeps_its_own_columns_over_an_items_fields_and_flattens_both() -> None:
    records = [
        {"id": 1, "meta": {"a": 1}, "lines": [{"_index": 9, "_parent_id": 7, "p": {"q": 1}}]}
    ]
    parents, children = split(records, ["id"], ["lines"], flat=True)
    assert parents == [{"id": 1, "meta__a": 1}]
    assert children["lines"] == [{"p__q": 1, "_parent_id": 1, "_index": 0}]
