"""MySQL/MariaDB names hold at most 64 characters: a table or column name longer than that
is a one-line error naming it (pagesync does not shorten names), on the real MariaDB."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, write_config
from sqlalchemy import create_engine

from pagesync.core.destination import Destination
from pagesync.core.errors import ExtractError


def test_a_stream_whose_table_name_is_too_long_for_mariadb_fails_check(tmp_path: Path) -> None:
    name = "x" * 50  # fits; its replace staging table (68 characters) does not
    stream = {"path": "/items", "primary_key": ["id"], "write_disposition": "replace"}
    path = write_config(tmp_path, "http://127.0.0.1:9", {name: stream},
                        destination="mysql+pymysql://root@127.0.0.1:3306/test")  # fmt: skip
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"streams.{name}: its table '{name}__pagesync_staging' is 68 characters" in (
        result.stderr
    )
    assert "at most 64" in result.stderr


def test_a_field_too_long_for_a_mariadb_column_is_named(mysql_url: str) -> None:
    engine = create_engine(mysql_url)
    field = "a_field_name_an_api_made_up_that_is_far_too_long_for_a_mariadb_column"
    dest = Destination(engine)
    try:
        with engine.begin() as conn:
            dest.write(conn, "items", ["id"], [{"id": 1}], partition="all", page=1)
        with pytest.raises(ExtractError) as info, engine.begin() as conn:
            dest.write(conn, "items", ["id"], [{"id": 2, field: 1}], partition="all", page=2)
        assert f"field {field!r} is {len(field)} characters" in str(info.value)
        assert "(table items)" in str(info.value) and not info.value.transient
        assert dest.count("items") == 1  # the page was refused whole
    finally:
        engine.dispose()
