"""JSON merge patch (RFC 7396): the RFC's own examples, and diff/apply round trips."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from helpers import same
from hypothesis import given, settings
from hypothesis import strategies as st

from pagesync.core.mergepatch import apply, diff

# RFC 7396, Appendix A: (original, patch, result), every row of the table.
RFC_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

# Section 3's worked example.
RFC_SECTION_3 = (
    {
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
    },
    {
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {"familyName": None},
        "tags": ["example"],
    },
    {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
    },
)


@pytest.mark.parametrize(("original", "patch", "result"), [*RFC_EXAMPLES, RFC_SECTION_3])
def test_rfc_7396_examples(original: Any, patch: Any, result: Any) -> None:
    before_original, before_patch = copy.deepcopy(original), copy.deepcopy(patch)
    assert apply(original, patch) == result
    # Neither argument is modified.
    assert original == before_original
    assert patch == before_patch


def test_apply_result_shares_no_dict_with_target() -> None:
    target = {"a": {"b": 1}}
    result = apply(target, {"a": {"c": 2}})
    result["a"]["d"] = 3
    assert target == {"a": {"b": 1}}


def test_null_deletes_and_missing_key_delete_is_harmless() -> None:
    assert apply({"cursor": "x", "next": "t"}, {"next": None, "gone": None}) == {"cursor": "x"}


def test_diff_examples() -> None:
    assert diff({}, {}) == {}
    assert diff({"a": 1}, {"a": 1}) == {}
    assert diff({"a": 1, "b": 2}, {"a": 1}) == {"b": None}
    assert diff({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}) == {"a": {"y": 3}}
    assert diff({"a": {"x": 1}}, {"a": {}}) == {"a": {"x": None}}
    assert diff({"a": [1, 2]}, {"a": [1, 2, 3]}) == {"a": [1, 2, 3]}
    assert diff({"a": "s"}, {"a": {"x": 1}}) == {"a": {"x": 1}}
    assert diff({"a": {"x": 1}}, {"a": "s"}) == {"a": "s"}


@pytest.mark.parametrize(("old", "new"), [(1, 1.0), (1, True), (0, False), (1.0, 1)])
def test_diff_sees_type_changes_between_equal_values(old: Any, new: Any) -> None:
    patch = diff({"v": old}, {"v": new})
    assert patch == {"v": new}
    assert type(apply({"v": old}, patch)["v"]) is type(new)


# -- property: apply(a, diff(a, b)) == b -------------------------------------------------------

scalars = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5)
)
keys = st.text(max_size=3)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=5)


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with some keys kept, some dropped, some replaced, and nested objects edited."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        action = draw(st.sampled_from(["keep", "drop", "replace", "edit"]))
        if action == "keep":
            out[key] = copy.deepcopy(value)
        elif action == "replace":
            out[key] = draw(values)
        elif action == "edit" and isinstance(value, dict):
            out[key] = draw(mutated(value))
    out.update(draw(st.dictionaries(keys.filter(lambda k: k not in doc), values, max_size=2)))
    return out


pairs = documents.flatmap(lambda a: st.tuples(st.just(a), mutated(a) | documents))


@settings(max_examples=100, deadline=None)
@given(pair=pairs)
def test_diff_then_apply_round_trips(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = pair
    a_copy, b_copy = copy.deepcopy(a), copy.deepcopy(b)
    patch = diff(a, b)
    assert same(apply(a, patch), b)
    assert same(a, a_copy) and same(b, b_copy)  # inputs untouched


@settings(max_examples=30, deadline=None)
@given(a=documents)
def test_diff_of_equal_documents_is_empty(a: dict[str, Any]) -> None:
    assert diff(a, copy.deepcopy(a)) == {}


@settings(max_examples=30, deadline=None)
@given(pair=pairs)
def test_diff_names_only_what_changed(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = pair
    patch = diff(a, b)
    for key in patch:
        assert key not in a or key not in b or not same(a[key], b[key])
