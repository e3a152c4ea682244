"""JSON merge patch (RFC 7396): how checkpoint updates and state migrations are expressed.

A patch names only what changes, and a null deletes a key, so a migration can rename a
key in one patch and a commit never has to resend the whole state.
"""

from __future__ import annotations

from typing import Any


def apply(target: Any, patch: Any) -> Any:
    """Return `target` with `patch` applied; neither argument is modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply(result.get(key), value)
    return result


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The smallest merge patch that turns `old` into `new` (values must not be null)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = diff(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value or type(before) is not type(value):
            patch[key] = value
    return patch
