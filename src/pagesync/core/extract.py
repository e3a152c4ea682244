"""Records out of a response body: parse with orjson, walk a dotted path to the list."""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ExtractError

_MISSING = object()
#: A default for `dig` that tells a path that is absent from one that holds null.
ABSENT = object()


def dig(obj: Any, path: str | None, default: Any = _MISSING) -> Any:
    """Walk a dotted path (`data.items`, `meta.next`, `items.0.id`) into parsed JSON.

    A missing step returns `default` when given, else raises KeyError naming the step.
    """
    if not path:
        return obj
    for step in path.split("."):
        if isinstance(obj, dict) and step in obj:
            obj = obj[step]
        elif (
            isinstance(obj, list)
            and step.lstrip("-").isdigit()
            and -len(obj) <= int(step) < len(obj)
        ):
            obj = obj[int(step)]
        else:
            if default is not _MISSING:
                return default
            raise KeyError(step)
    return obj


def found_instead(obj: Any, path: str | None) -> str:
    """What a response held where `path` found nothing: the keys (never the values, which
    may be secret) of the deepest object the path reached, a few of them."""
    where = []
    for step in (path or "").split("."):
        if isinstance(obj, dict) and step in obj and isinstance(obj[step], dict | list):
            obj = obj[step]
            where.append(step)
        else:
            break
    at = f" at {'.'.join(where)!r}" if where else ""
    if isinstance(obj, dict):
        keys = list(obj)
        shown = ", ".join(map(str, keys[:6])) + (
            f", ... ({len(keys)} keys)" if len(keys) > 6 else ""
        )
        return f"it holds keys {shown}{at}" if keys else f"it holds an empty object{at}"
    return f"it holds a {type(obj).__name__}{at}"


def values_at(records: list[Any], path: str) -> list[Any]:
    """The non-null values at `path` in each record, in order (a page's cursor values).

    A plain field name, the usual case, is read with dict.get: five times faster than
    walking the path, which matters for every record of every page."""
    if "." not in path:
        try:
            return [v for r in records if (v := r.get(path)) is not None]
        except AttributeError:  # a record that is not an object: the general walk says so
            pass
    return [v for v in (dig(r, path, None) for r in records) if v is not None]


def cursor_values(records: list[Any], field: str) -> list[Any]:
    """The page's cursor values; a field none of the records has is the config's error
    (a typo in `cursor.field`), not a page without values."""
    values = values_at(records, field)
    if not values and records and all(dig(r, field, ABSENT) is ABSENT for r in records):
        raise ExtractError(
            f"cursor.field: {field!r} is in none of the page's records "
            f"({found_instead(records[0], field)} in the first)",
            transient=False,
        )
    return values


def parse_body(content: bytes, content_type: str | None = None) -> Any:
    """Parse a JSON body; an empty, HTML or broken body is an ExtractError (worth a retry)."""
    if not content or content.isspace():  # not strip(): that copies the body
        raise ExtractError("empty response body where JSON was expected")
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as e:
        kind = "HTML" if content.lstrip()[:1] == b"<" else "malformed JSON"
        ctype = f" (content-type {content_type})" if content_type else ""
        raise ExtractError(f"{kind} in response body{ctype}: {e}") from None


def records_at(body: Any, path: str | None) -> list[dict[str, Any]]:
    """The list of records at `path` in the body; anything else is an ExtractError."""
    try:
        found = dig(body, path)
    except KeyError as e:
        raise ExtractError(
            f"records: {path!r} not found in the response (missing key {e.args[0]!r}; "
            f"{found_instead(body, path)})",
            transient=False,
        ) from None
    if found is None:
        return []
    if not isinstance(found, list):
        raise ExtractError(
            f"records: {path or '(body)'!r} holds {type(found).__name__}, not a list",
            transient=False,
        )
    if found and not isinstance(found[0], dict):
        raise ExtractError(
            f"records: {path or '(body)'!r} holds a list of {type(found[0]).__name__}, "
            "not JSON objects",
            transient=False,
        )
    return found
