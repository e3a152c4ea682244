"""Properties of state migrations and of checkpoints as merge patches, on a real SQLite store.

test_mergepatch.py already checks `apply(a, diff(a, b)) == b` on documents in memory; what
it cannot see is the store: states go through JSON text in a database, migrations run
through `Store.migrate` and `patch_all_states` in one transaction, checkpoints through
`Store.write` one patch after another. Here, for arbitrary states:

- a chain of checkpoints, each the diff from the stored state to the next document, leaves
  exactly that document in the database (types kept: 1 is not 1.0 nor True);
- key-renaming migrations move their keys and leave every other key as it was;
- migrating in one go or in two steps gives the same states, and migrating again changes
  nothing: each version is applied once;
- a migration that fails half way leaves states, versions and the schema version untouched.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import same
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from pagesync.core import mergepatch
from pagesync.core import store as store_mod
from pagesync.core.store import P, Store, dumps, loads

# JSON as orjson stores it: 64-bit integers, finite floats, no null (a checkpoint never
# stores one: a null in a merge patch deletes).
scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
keys = st.sampled_from(["cursor", "next", "page", "sorted", "start", "a", "b", "c"]) | st.text(
    max_size=4
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=10,
)
documents = st.dictionaries(keys, values, max_size=6)
#: A key rename, old -> new; often of keys the states have.
renames = st.tuples(keys, keys).filter(lambda r: r[0] != r[1])


def renamed(doc: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """What renaming `old` to `new` should make of `doc` (nothing, when `old` is absent)."""
    if old not in doc:
        return doc
    out = {k: v for k, v in doc.items() if k != old}
    out[new] = doc[old]
    return out


def rename_migration(old: str, new: str, *, fail: bool = False) -> store_mod.Migration:
    """A migration written as the store expects: a merge patch per partition's state."""

    def step(conn: Connection) -> None:
        store_mod.patch_all_states(conn, lambda st: mergepatch.diff(st, renamed(st, old, new)))
        if fail:
            raise RuntimeError("migration failed half way")

    return step


@contextmanager
def fresh_store() -> Iterator[str]:
    """A migrated SQLite store of its own for one example."""
    with tempfile.TemporaryDirectory(prefix="pagesync-prop-") as folder:
        url = f"sqlite:///{Path(folder) / 'state.db'}"
        Store(url).migrate()
        try:
            yield url
        finally:
            engine = store_mod._ENGINES.pop(url, None)
            if engine is not None:
                engine.dispose()


def put_states(url: str, states: list[dict[str, Any]]) -> None:
    with Store(url).writing() as conn:
        conn.execute(
            insert(P),
            [{"stream": "items", "scope": "", "partition": f"p{i}", "status": "incomplete",
              "state": dumps(s), "version": 7, "pages": 0, "records": 0} for i, s in enumerate(states)],
        )  # fmt: skip


def read_rows(url: str) -> list[tuple[str, dict[str, Any], int]]:
    with Store(url).reading() as conn:
        q = select(P.c.partition, P.c.state, P.c.version).order_by(P.c.partition)
        return [(p, loads(s), v) for p, s, v in conn.execute(q)]


def schema_of(url: str) -> int:
    s = Store(url)
    with s.reading() as conn:
        return s.schema_version(conn)


def migrate_to(url: str, steps: list[store_mod.Migration]) -> None:
    """Run Store.migrate as a pagesync whose MIGRATIONS end with `steps`."""
    with pytest.MonkeyPatch.context() as mp:
        base = list(store_mod.MIGRATIONS)
        mp.setattr(store_mod, "MIGRATIONS", [*base, *steps])
        mp.setattr(store_mod, "SCHEMA_VERSION", len(base) + len(steps))
        Store(url).migrate()


@settings(max_examples=40, deadline=None)
@given(
    states=st.lists(documents, min_size=1, max_size=4),
    chain=st.lists(renames, min_size=1, max_size=3),
    split=st.integers(min_value=0, max_value=3),
)
def test_rename_migrations_move_their_keys_once_and_keep_every_other_key(
    states: list[dict[str, Any]], chain: list[tuple[str, str]], split: int
) -> None:
    base = store_mod.SCHEMA_VERSION
    steps = [rename_migration(old, new) for old, new in chain]
    expected = []
    for doc in states:
        for old, new in chain:
            doc = renamed(doc, old, new)
        expected.append(doc)
    with fresh_store() as url:
        put_states(url, states)
        first = min(split, len(steps))
        migrate_to(url, steps[:first])  # an older pagesync migrated part of the way
        assert schema_of(url) == base + first
        migrate_to(url, steps)
        rows = read_rows(url)
        assert schema_of(url) == base + len(steps)
        for (_, got, version), want, before in zip(rows, expected, states, strict=True):
            assert same(got, want), (before, chain, got, want)
            touched = {k for pair in chain for k in pair}
            for key in before.keys() - touched:  # never renamed: kept as it was
                assert key in got and same(got[key], before[key])
            assert version == 7 + len(steps), "each migration bumps the version once"
        migrate_to(url, steps)  # again: every version is already applied
        assert read_rows(url) == rows
        assert schema_of(url) == base + len(steps)


@settings(max_examples=30, deadline=None)
@given(
    states=st.lists(documents, min_size=1, max_size=4),
    chain=st.lists(renames, min_size=1, max_size=3),
    data=st.data(),
)
def test_a_migration_that_fails_half_way_changes_nothing(
    states: list[dict[str, Any]], chain: list[tuple[str, str]], data: st.DataObject
) -> None:
    base = store_mod.SCHEMA_VERSION
    failing = data.draw(st.integers(min_value=0, max_value=len(chain) - 1), label="failing")
    broken = [rename_migration(o, n, fail=i == failing) for i, (o, n) in enumerate(chain)]
    with fresh_store() as url:
        put_states(url, states)
        before = read_rows(url)
        with pytest.raises(RuntimeError, match="half way"):
            migrate_to(url, broken)
        assert read_rows(url) == before  # the steps before it rolled back too
        assert schema_of(url) == base
        migrate_to(url, [rename_migration(o, n) for o, n in chain])  # fixed: now it runs
        assert schema_of(url) == base + len(chain)
        assert all(v == 7 + len(chain) for _, _, v in read_rows(url))


@settings(max_examples=40, deadline=None)
@given(chain=st.lists(documents, min_size=1, max_size=6))
def test_checkpoints_as_merge_patches_leave_exactly_the_last_document(
    chain: list[dict[str, Any]],
) -> None:
    with fresh_store() as url:
        s = Store(url)
        s.ensure("items", "", ["all"])
        lease = s.acquire("items", "", "all", "test:1:-")
        for doc in chain:
            patch = mergepatch.diff(lease.state, doc)
            s.commit(lease, patch=patch)
            [(_, stored, version)] = read_rows(url)
            assert same(stored, doc), (patch, stored, doc)
            assert same(lease.state, doc) and version == lease.version
        # A second copy of the state, as another process would read it, agrees.
        [row] = Store(url).partitions("items")
        assert same(row["state"], chain[-1])
