"""Records out of a body: dotted paths, JSON parsing, and errors that say what was found."""

from __future__ import annotations

from typing import Any

import pytest

from pagesync.core.errors import ExtractError
from pagesync.core.extract import dig, parse_body, records_at, values_at

BODY: dict[str, Any] = {
    "data": {"items": [{"id": 1, "tags": ["a", "b"]}, {"id": 2, "tags": []}], "total": 2},
    "meta": {"next": None, "0": "zero-key"},
    "rows": [[10, 11], [20, 21]],
}


# -- dig ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("data.total", 2),
        ("data.items.0.id", 1),
        ("data.items.1.id", 2),
        ("data.items.-1.id", 2),
        ("data.items.0.tags.1", "b"),
        ("rows.1.0", 20),
        ("meta.next", None),
        ("meta.0", "zero-key"),  # a dict key that looks like a number is a key
    ],
)
def test_dig_walks_dicts_and_lists(path: str, expected: Any) -> None:
    assert dig(BODY, path) == expected


@pytest.mark.parametrize("path", [None, ""])
def test_dig_without_path_is_the_body(path: str | None) -> None:
    assert dig(BODY, path) is BODY


@pytest.mark.parametrize(
    ("path", "step"),
    [
        ("data.missing", "missing"),
        ("nope.items", "nope"),
        ("data.items.2", "2"),  # out of range
        ("data.items.-3", "-3"),
        ("data.items.first", "first"),  # not an index
        ("data.total.x", "x"),  # into a scalar
        ("meta.next.x", "x"),  # into null
    ],
)
def test_dig_missing_raises_keyerror_naming_the_step(path: str, step: str) -> None:
    with pytest.raises(KeyError) as info:
        dig(BODY, path)
    assert info.value.args[0] == step


def test_dig_missing_returns_default() -> None:
    assert dig(BODY, "data.missing", None) is None
    assert dig(BODY, "data.items.9.id", "fallback") == "fallback"
    assert dig(BODY, "data.total", "fallback") == 2  # found values win over the default


def test_dig_on_a_list_body() -> None:
    assert dig([{"id": 7}], "0.id") == 7


# -- parse_body -------------------------------------------------------------------------------


def test_parse_body_json() -> None:
    assert parse_body(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert parse_body(b"[]") == []


@pytest.mark.parametrize("content", [b"", b"   ", b"\n\r\n"])
def test_parse_body_empty(content: bytes) -> None:
    with pytest.raises(ExtractError, match="empty response body") as info:
        parse_body(content)
    assert info.value.transient is True  # worth a retry


def test_parse_body_html_says_html_and_content_type() -> None:
    html = b"  <!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
    with pytest.raises(ExtractError) as info:
        parse_body(html, "text/html; charset=utf-8")
    message = str(info.value)
    assert "HTML" in message
    assert "content-type text/html; charset=utf-8" in message
    assert info.value.transient is True


@pytest.mark.parametrize("content", [b'{"data": [1, 2', b'{"a": 1}\x00<<garbage', b"nan?"])
def test_parse_body_malformed(content: bytes) -> None:
    with pytest.raises(ExtractError) as info:
        parse_body(content, "application/json")
    message = str(info.value)
    assert "malformed JSON" in message
    assert "application/json" in message
    assert info.value.transient is True


def test_parse_body_without_content_type() -> None:
    with pytest.raises(ExtractError) as info:
        parse_body(b"{oops")
    assert "content-type" not in str(info.value)


# -- records_at -------------------------------------------------------------------------------


def test_records_at_path() -> None:
    assert records_at(BODY, "data.items") == BODY["data"]["items"]


def test_records_at_body_itself() -> None:
    body = [{"id": 1}, {"id": 2}]
    assert records_at(body, None) == body


def test_records_at_missing_path_is_not_transient() -> None:
    with pytest.raises(ExtractError) as info:
        records_at({"unexpected": True}, "data.items")
    message = str(info.value)
    assert "'data.items'" in message
    assert "'data'" in message  # the missing key
    assert info.value.transient is False


@pytest.mark.parametrize(
    ("body", "kind"), [({"data": {"a": 1}}, "dict"), ({"data": "x"}, "str"), ({"data": 3}, "int")]
)
def test_records_at_non_list_is_an_error(body: dict[str, Any], kind: str) -> None:
    with pytest.raises(ExtractError) as info:
        records_at(body, "data")
    assert kind in str(info.value)
    assert "not a list" in str(info.value)
    assert info.value.transient is False


def test_records_at_body_not_a_list() -> None:
    with pytest.raises(ExtractError, match=r"\(body\).*dict, not a list"):
        records_at({"data": []}, None)


def test_records_at_list_of_scalars_is_an_error() -> None:
    with pytest.raises(ExtractError, match="not JSON objects") as info:
        records_at({"data": [1, 2, 3]}, "data")
    assert info.value.transient is False


def test_records_at_null_is_no_records() -> None:
    assert records_at({"data": {"items": None}}, "data.items") == []
    assert records_at({"data": []}, "data") == []


def test_values_at_reads_plain_and_dotted_fields_and_skips_nulls() -> None:
    records = [{"t": 3, "m": {"u": "b"}}, {"t": None, "m": {}}, {"m": {"u": "a"}}, {"t": 1}]
    assert values_at(records, "t") == [3, 1]
    assert values_at(records, "m.u") == ["b", "a"]
    assert values_at([[5], {"t": 2}], "t") == [2]  # a record that is not an object has none
