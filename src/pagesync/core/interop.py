"""State from and to other tools, so their users can move over without re-syncing.

Accepted on import: an Airbyte per-stream state array (messages of `type: STREAM`), an
Airbyte global state message (`type: GLOBAL`), a legacy state object keyed by stream name
(`{"items": {"updated_at": "..."}}`), and `[]`, which means "nothing synced yet".
Export writes the per-stream array, the form Airbyte itself reads back.
"""

from __future__ import annotations

from typing import Any

from . import config as cfg
from .errors import StateError
from .partitions import DEFAULT_KEY
from .store import COMPLETE, Store, owner_id


def cursor_from(state: Any, stream: str, spec: cfg.Stream) -> Any | None:
    """The cursor value for `stream` in any accepted state form (None: nothing yet)."""
    field = spec.cursor.field if spec.cursor else None
    if state in ([], {}, None):
        return None
    stream_state: Any = None
    if isinstance(state, list):
        for message in state:
            if not isinstance(message, dict):
                raise StateError("a state array holds objects (Airbyte state messages)")
            kind = message.get("type", "STREAM")
            if kind == "STREAM":
                desc = message.get("stream", {}).get("stream_descriptor", {})
                if desc.get("name") == stream:
                    stream_state = message["stream"].get("stream_state")
            elif kind == "GLOBAL":
                stream_state = _from_global(message.get("global", {}), stream)
            elif kind == "LEGACY":
                stream_state = (message.get("data") or {}).get(stream)
    elif isinstance(state, dict):
        if state.get("type") == "GLOBAL":
            stream_state = _from_global(state.get("global", {}), stream)
        else:
            stream_state = state.get(stream)
    else:
        raise StateError("state must be a JSON array or object")
    if stream_state in (None, {}):
        return None
    if not isinstance(stream_state, dict):
        raise StateError(f"state for stream {stream!r} must be an object")
    if field is None:
        raise StateError(f"stream {stream!r} has no cursor: there is nothing to import into")
    # Airbyte stores the cursor under the cursor field's name (its last dotted step).
    for key in (field, field.rsplit(".", 1)[-1], "cursor"):
        if key in stream_state:
            return stream_state[key]
    raise StateError(f"state for stream {stream!r} has no value for cursor field {field!r}")


def _from_global(glob: dict[str, Any], stream: str) -> Any:
    for entry in glob.get("stream_states", []):
        if entry.get("stream_descriptor", {}).get("name") == stream:
            return entry.get("stream_state")
    return None


def import_state(store: Store, config: cfg.Config, stream: str, state: Any) -> Any | None:
    """Make the stream's next run start from the imported cursor; returns it."""
    spec = config.stream(stream)
    if spec.partitions is not None:
        raise StateError("importing state is supported for streams without partitions")
    value = cursor_from(state, stream, spec)
    store.migrate()
    store.reset(stream, scope="")
    if value is None:
        return None
    store.ensure(stream, "", [DEFAULT_KEY])
    lease = store.acquire(stream, "", DEFAULT_KEY, owner_id())
    patch = {
        "cursor": value,
        "start": value,
        "resume": value,
        "sorted": True,
        "done": True,
        "page": 0,
    }
    store.commit(lease, patch=patch, status=COMPLETE, release=True)
    return value


def export_state(store: Store, config: cfg.Config, stream: str) -> list[dict[str, Any]]:
    """The stream's high-water mark as an Airbyte per-stream state array."""
    spec = config.stream(stream)
    value = store.high_water_mark(stream)
    if value is None or spec.cursor is None:
        return []
    stream_state = {spec.cursor.field.rsplit(".", 1)[-1]: value}
    return [
        {
            "type": "STREAM",
            "stream": {"stream_descriptor": {"name": stream}, "stream_state": stream_state},
        }
    ]
