"""pagesync.yaml: loading, ${ENV} expansion, and errors that name the file and the key path."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pagesync.core import config as cfg
from pagesync.core.config import config_path, load_config, parse_config
from pagesync.core.errors import ConfigError

# The reference config of shared/DESIGN.md, with every key the contract names.
REFERENCE = """\
state: sqlite:///pagesync.db
destination: sqlite:///pagesync.db
sources:
  shop:
    base_url: http://127.0.0.1:8001
    headers: {Authorization: "Bearer ${SHOP_TOKEN}"}
    timeout: 30
    retry: {attempts: 5, backoff: 0.5, max_backoff: 30}
    rate_limit: {per_second: 10}
    concurrency: 4
streams:
  items:
    source: shop
    path: /items
    params: {category: books}
    records: data.items
    primary_key: [id]
    cursor: {field: updated_at, param: updated_at__gte}
    paginator: {type: cursor, path: meta.next, param: cursor, stable_tokens: true}
    partitions: {type: datetime, start: 2024-01-01T00:00:00Z, end: 2024-02-01T00:00:00Z, step: P1D, start_param: updated_at__gte, end_param: updated_at__lt}
    checkpoint: {every_pages: 1, every_records: null, every_seconds: null}
    schedule: {cron: "*/15 * * * *"}
  by_url:
    source: shop
    path: /next/items
    paginator: {type: next_url, path: next_url}
    primary_key: [id]
    partitions: {type: list, values: [a, b], param: category}
  by_link:
    source: shop
    path: /link/items
    paginator: {type: link_header}
    primary_key: [id]
    partitions: {type: parent, stream: customers, key: id}
    schedule: {interval: 900}
  by_offset:
    source: shop
    path: /offset/items
    paginator: {type: offset, limit: 100, limit_param: limit, offset_param: offset}
    primary_key: [id]
  customers:
    source: shop
    path: /customers
    paginator: {type: page_number, param: page, start: 1}
    primary_key: [id]
"""


def write(folder: Path, text: str, name: str = "pagesync.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**stream: Any) -> dict[str, Any]:
    """A valid config mapping with one source `shop` and one stream `items`."""
    spec = {"source": "shop", "path": "/items", "primary_key": ["id"], **stream}
    return {"sources": {"shop": {"base_url": "http://127.0.0.1:8001"}}, "streams": {"items": spec}}


def error_of(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    return str(info.value)


# -- a complete, valid file ------------------------------------------------------------------


def test_reference_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_TOKEN", "s3cret")
    path = write(tmp_path, REFERENCE)
    config = load_config(path)

    assert config.path == path.resolve()
    assert config.state == f"sqlite:///{tmp_path.resolve() / 'pagesync.db'}"
    assert config.destination_url == config.state
    source = config.sources["shop"]
    assert source.headers == {"Authorization": "Bearer s3cret"}
    assert source.timeout == 30
    assert (source.retry.attempts, source.retry.backoff, source.retry.max_backoff) == (5, 0.5, 30)
    assert source.rate_limit is not None and source.rate_limit.per_second == 10
    assert source.concurrency == 4
    assert source.follow_foreign_next is False

    items = config.stream("items")
    assert items.records == "data.items"
    assert items.primary_key == ["id"]
    assert items.params == {"category": "books"}
    assert items.cursor is not None
    assert (items.cursor.field, items.cursor.param) == ("updated_at", "updated_at__gte")
    assert isinstance(items.paginator, cfg.CursorPaginator)
    assert (items.paginator.path, items.paginator.param) == ("meta.next", "cursor")
    assert items.paginator.stable_tokens is True
    parts = items.partitions
    assert isinstance(parts, cfg.DatetimePartitions)
    assert parts.start == datetime(2024, 1, 1, tzinfo=UTC)
    assert parts.end == datetime(2024, 2, 1, tzinfo=UTC)
    assert parts.step == timedelta(days=1)
    assert (parts.start_param, parts.end_param) == ("updated_at__gte", "updated_at__lt")
    assert items.checkpoint.every_pages == 1 and items.checkpoint.every_records is None
    assert items.schedule is not None and items.schedule.cron == "*/15 * * * *"

    assert isinstance(config.streams["by_url"].paginator, cfg.NextUrlPaginator)
    assert isinstance(config.streams["by_url"].partitions, cfg.ListPartitions)
    assert config.streams["by_url"].partitions.values == ["a", "b"]
    assert isinstance(config.streams["by_link"].paginator, cfg.LinkHeaderPaginator)
    assert isinstance(config.streams["by_link"].partitions, cfg.ParentPartitions)
    assert config.streams["by_link"].schedule.interval == 900
    offset = config.streams["by_offset"].paginator
    assert isinstance(offset, cfg.OffsetPaginator) and offset.limit == 100
    assert isinstance(config.streams["customers"].paginator, cfg.PageNumberPaginator)


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(minimal())))
    stream = config.streams["items"]
    assert isinstance(stream.paginator, cfg.SinglePagePaginator)
    assert stream.partitions is None and stream.cursor is None
    assert config.destination is None
    assert config.destination_url == config.state
    assert stream.checkpoint.every_pages == 1
    assert config.sources["shop"].retry.attempts == 5


def test_default_state_resolves_like_the_same_url_written_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving `state` out must mean the documented default, `sqlite:///pagesync.db`, which
    (like any relative SQLite path) lives next to the config file, not in the current folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    implicit = tmp_path / "implicit"
    explicit = tmp_path / "explicit"
    implicit.mkdir()
    explicit.mkdir()
    written = {**minimal(), "state": "sqlite:///pagesync.db"}
    assert load_config(write(explicit, yaml.safe_dump(written))).state == (
        f"sqlite:///{explicit.resolve() / 'pagesync.db'}"
    )
    config = load_config(write(implicit, yaml.safe_dump(minimal())))
    assert config.state == f"sqlite:///{implicit.resolve() / 'pagesync.db'}"
    assert config.destination_url == config.state


def test_unknown_stream_name_is_a_config_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, yaml.safe_dump(minimal())))
    with pytest.raises(ConfigError, match=r"unknown stream 'nope' \(streams: items\)"):
        config.stream("nope")


# -- ${ENV} expansion -------------------------------------------------------------------------


def test_env_expansion_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_HOST", "api.example.com")
    monkeypatch.setenv("PS_TIMEOUT", "7.5")
    monkeypatch.delenv("PS_UNSET", raising=False)
    path = write(
        tmp_path,
        """\
        sources:
          shop:
            base_url: https://${PS_HOST}/v1
            timeout: ${PS_TIMEOUT}
            headers:
              X-Region: ${PS_UNSET:-eu-west}
              X-Empty: "${PS_UNSET:-}"
              X-Both: "${PS_HOST}:${PS_UNSET:-443}"
        streams:
          items: {source: shop, path: /items, primary_key: [id], params: {q: "${PS_UNSET:-all}"}}
        """,
    )
    config = load_config(path)
    source = config.sources["shop"]
    assert source.base_url == "https://api.example.com/v1"
    assert source.timeout == 7.5
    assert source.headers == {
        "X-Region": "eu-west",
        "X-Empty": "",
        "X-Both": "api.example.com:443",
    }
    assert config.streams["items"].params == {"q": "all"}


def test_set_env_var_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PS_REGION", "us-east")
    data = minimal()
    data["sources"]["shop"]["headers"] = {"X-Region": "${PS_REGION:-eu-west}"}
    path = write(tmp_path, yaml.safe_dump(data))
    assert load_config(path).sources["shop"].headers == {"X-Region": "us-east"}


def test_missing_env_var_names_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PS_MISSING_TOKEN", raising=False)
    data = minimal()
    data["sources"]["shop"]["headers"] = {"Authorization": "Bearer ${PS_MISSING_TOKEN}"}
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "sources.shop.headers.Authorization"
    assert str(path) in str(err)
    assert "sources.shop.headers.Authorization" in str(err)
    assert "PS_MISSING_TOKEN" in str(err)


def test_missing_env_var_in_a_list_names_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PS_MISSING_KEY", raising=False)
    path = write(tmp_path, yaml.safe_dump(minimal(primary_key=["id", "${PS_MISSING_KEY}"])))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "streams.items.primary_key[1]"
    assert "PS_MISSING_KEY" in str(info.value)


# -- invalid files: the error names the file and the key path -------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(recrods="data.items"))
    assert "bad.yaml" in message
    assert "streams.items.recrods" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    data = minimal()
    data["destinaton"] = "sqlite:///x.db"
    assert "destinaton" in error_of(tmp_path, data)


def test_wrong_type(tmp_path: Path) -> None:
    data = minimal()
    data["sources"]["shop"]["timeout"] = "soon"
    message = error_of(tmp_path, data)
    assert "bad.yaml" in message
    assert "sources.shop.timeout" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    data = minimal()
    data["sources"]["shop"]["retry"] = {"attempts": 0}
    assert "sources.shop.retry.attempts" in error_of(tmp_path, data)


def test_bad_paginator_type(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(paginator={"type": "infinite_scroll"}))
    assert "bad.yaml" in message
    assert "streams.items.paginator" in message
    assert "infinite_scroll" in message
    assert "next_url" in message  # the kinds it could have been


def test_unknown_paginator_key_names_the_path_in_the_file(tmp_path: Path) -> None:
    """The key path is the one in the file: `paginator.lmit`, not `paginator.offset.lmit`."""
    message = error_of(tmp_path, minimal(paginator={"type": "offset", "lmit": 10}))
    assert "streams.items.paginator.lmit" in message, message


def test_a_child_table_of_a_primary_key_field_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(nested={"child_tables": ["id"]}))
    assert "streams.items" in message and "'id' is part of the primary key" in message, message


def test_unknown_source_reference(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(source="warehouse"))
    assert "bad.yaml" in message
    assert "streams.items.source" in message
    assert "warehouse" in message
    assert "shop" in message  # the known sources


def test_unknown_parent_stream(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(partitions={"type": "parent", "stream": "ghosts"}))
    assert "streams.items.partitions.stream" in message
    assert "ghosts" in message


@pytest.mark.parametrize(
    ("step", "why"),
    [("PT0S", "positive duration"), ("-P1D", "positive duration"), ("fortnightly", "timedelta")],
)
def test_bad_partitions_step(tmp_path: Path, step: str, why: str) -> None:
    partitions = {"type": "datetime", "start": "2024-01-01T00:00:00Z", "step": step}
    message = error_of(tmp_path, minimal(partitions=partitions))
    assert "bad.yaml" in message
    assert why in message
    # The path as written in the file: there is no `datetime` key under `partitions`.
    assert "streams.items.partitions.step" in message, message


def test_schedule_needs_exactly_one_of_cron_or_interval(tmp_path: Path) -> None:
    message = error_of(tmp_path, minimal(schedule={"cron": "* * * * *", "interval": 60}))
    assert "streams.items.schedule" in message
    assert "exactly one" in message


def test_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_config(path)
    assert info.value.file == str(path)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        sources:
          shop:
            base_url: http://127.0.0.1:8001
           timeout: 5
        streams: {}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 4" in message
    assert "invalid YAML" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


# -- SQLite paths resolve against the config file's folder ----------------------------------


def test_relative_sqlite_paths_resolve_against_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "conf"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = minimal()
    data["state"] = "sqlite:///state/pagesync.db"
    data["destination"] = "sqlite:///../warehouse.db"
    config = load_config(write(folder, yaml.safe_dump(data)))
    assert config.state == f"sqlite:///{folder.resolve() / 'state' / 'pagesync.db'}"
    assert config.destination == f"sqlite:///{(tmp_path / 'project' / 'warehouse.db').resolve()}"


def test_absolute_sqlite_and_postgres_urls_untouched(tmp_path: Path) -> None:
    data = minimal()
    data["state"] = "postgresql+psycopg://u:p@db.example.com:5432/state"
    data["destination"] = "sqlite:////var/lib/pagesync/warehouse.db"
    config = load_config(write(tmp_path, yaml.safe_dump(data)))
    assert config.state == "postgresql+psycopg://u:p@db.example.com:5432/state"
    assert config.destination == "sqlite:////var/lib/pagesync/warehouse.db"
    assert config.destination_url == "sqlite:////var/lib/pagesync/warehouse.db"


def test_in_memory_sqlite_untouched() -> None:
    assert cfg.resolve_sqlite("sqlite:///:memory:", Path("/x")) == "sqlite:///:memory:"
    assert cfg.resolve_sqlite("sqlite://", Path("/x")) == "sqlite://"


def test_destination_defaults_to_state(tmp_path: Path) -> None:
    data = minimal()
    data["state"] = "postgresql+psycopg://db/state"
    config = load_config(write(tmp_path, yaml.safe_dump(data)))
    assert config.destination is None
    assert config.destination_url == "postgresql+psycopg://db/state"


def test_parse_config_resolves_against_given_folder(tmp_path: Path) -> None:
    config = parse_config({**minimal(), "state": "sqlite:///pagesync.db"}, folder=tmp_path)
    assert config.state == f"sqlite:///{tmp_path.resolve() / 'pagesync.db'}"


# -- which file ---------------------------------------------------------------------------------


def test_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGESYNC_CONFIG", raising=False)
    assert config_path() == Path("pagesync.yaml")
    monkeypatch.setenv("PAGESYNC_CONFIG", "/etc/pagesync/env.yaml")
    assert config_path() == Path("/etc/pagesync/env.yaml")
    assert config_path("cli.yaml") == Path("cli.yaml")
    assert config_path(tmp_path / "x.yaml") == tmp_path / "x.yaml"


def test_load_config_follows_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def project(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        data = minimal()
        data["sources"]["shop"]["base_url"] = f"http://{name}.example.com"
        return write(folder, yaml.safe_dump(data))

    cwd_file, env_file, cli_file = project("cwd"), project("env"), project("cli")
    monkeypatch.chdir(cwd_file.parent)
    monkeypatch.delenv("PAGESYNC_CONFIG", raising=False)
    assert load_config().sources["shop"].base_url == "http://cwd.example.com"
    monkeypatch.setenv("PAGESYNC_CONFIG", str(env_file))
    assert load_config().sources["shop"].base_url == "http://env.example.com"
    assert load_config(cli_file).sources["shop"].base_url == "http://cli.example.com"


def test_lease_ttl_below_its_minimum_names_the_key(tmp_path: Path) -> None:
    data = minimal()
    data["sources"]["shop"]["lease_ttl"] = 0.5
    message = error_of(tmp_path, data)
    assert "sources.shop.lease_ttl" in message and "greater than or equal to 2" in message


def test_fan_out_keys(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(minimal(fan_out="deployment", fan_out_batch=4)))
    cfg = load_config(path)
    assert (cfg.streams["items"].fan_out, cfg.streams["items"].fan_out_batch) == ("deployment", 4)
    assert cfg.sources["shop"].lease_ttl == 300
    message = error_of(tmp_path, minimal(fan_out="processes"))
    assert "streams.items.fan_out" in message and "'threads' or 'deployment'" in message
