"""The CLI contract: exit codes, messages for people, JSON fields for scripts."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import STREAMS, run_cli, write_config

from pagesync.demo.api import DemoAPI


def test_run_state_history_reset(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    run = run_cli("run", "items", "-c", str(path))
    assert run.returncode == 0, run.stderr
    pages = -(-len(api.items) // 150)
    assert f"1/1 partitions complete, {pages} pages, {len(api.items)} records" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr

    state = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    [row] = state
    assert {"partition", "status", "cursor", "pages", "records", "updated_at"} <= set(row)
    assert row["status"] == "complete" and row["pages"] == pages
    assert row["records"] == len(api.items)
    assert row["cursor"] == max(i["updated_at"] for i in api.items)

    hist = json.loads(run_cli("history", "items", "-c", str(path), "--json").stdout)
    assert [h["page"] for h in hist] == list(range(1, pages + 1))
    assert sum(h["records"] for h in hist) == len(api.items)
    fields = {
        "partition",
        "page",
        "records",
        "cursor",
        "committed_at",
        "flow_run_id",
        "task_run_id",
    }
    assert fields <= set(hist[0])
    assert all(h["flow_run_id"] and h["task_run_id"] for h in hist)
    assert len({h["task_run_id"] for h in hist}) == pages  # one task run per page

    table = run_cli("state", "-c", str(path))
    assert "items" in table.stdout and "complete" in table.stdout

    reset = run_cli("reset", "items", "-c", str(path))
    assert reset.returncode == 0
    assert json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout) == []


def test_failed_partition_exits_1_keeps_progress_and_says_where(
    tmp_path: Path, api: DemoAPI
) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    api.add_fault(kind="status", status=500, after=3, times=-1, path="/cursor/items")
    run = run_cli("run", "items", "-c", str(path))
    assert run.returncode == 1
    err = run.stderr
    assert "stream items, partition all, page 4" in err and "HTTP 500" in err
    assert "last committed cursor" in err and "Traceback" not in err
    [row] = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    assert row["status"] == "incomplete" and row["pages"] == 3  # the 3 good pages are kept
    assert row["error"] and "HTTP 500" in row["error"]


def test_bad_config_exit_2_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "pagesync.yaml"
    path.write_text(
        "sources: {shop: {base_url: http://x}}\n"
        "streams: {items: {source: shop, path: /i, primary_key: [id], paginator: {type: nope}}}\n"
    )
    run = run_cli("run", "items", "-c", str(path))
    assert run.returncode == 2
    assert str(path) in run.stderr and "streams.items.paginator" in run.stderr
    assert "Traceback" not in run.stderr
    missing = run_cli("run", "items", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "not found" in missing.stderr
    path.write_text("sources: {shop: {base_url: http://x}}\nstreams: {}\n")
    unknown = run_cli("run", "items", "-c", str(path))
    assert unknown.returncode == 2 and "unknown stream 'items'" in unknown.stderr


def test_config_from_environment_variable(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    state = run_cli("state", "--json", cwd=tmp_path.parent, PAGESYNC_CONFIG=str(path))
    assert state.returncode == 0 and json.loads(state.stdout) == []


def test_check_reaches_sources(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    ok = run_cli("check", "-c", str(path))
    assert ok.returncode == 0 and "items" in ok.stdout and "200" in ok.stdout
    bad = write_config(tmp_path, "http://127.0.0.1:9", {"items": STREAMS["cursor"]})
    down = run_cli("check", "-c", str(bad))
    assert down.returncode == 1 and "ConnectError" in down.stdout


def test_demo_syncs_the_bundled_api(tmp_path: Path) -> None:
    run = run_cli("demo", "--folder", str(tmp_path / "demo"), "--items", "3000", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1/1 partitions complete, 3 pages, 3000 records" in run.stdout
    state = json.loads(
        run_cli("state", "items", "-c", str(tmp_path / "demo" / "pagesync.yaml"), "--json").stdout
    )
    assert state[0]["records"] == 3000


def test_init_writes_a_valid_starter_and_refuses_to_overwrite(tmp_path: Path) -> None:
    made = run_cli("init", str(tmp_path / "proj"))
    assert made.returncode == 0, made.stderr
    config = tmp_path / "proj" / "pagesync.yaml"
    assert (tmp_path / "proj" / "streams.py").exists()
    from pagesync.core.config import load_config

    cfg = load_config(config)  # the starter is a valid config
    assert cfg.streams["issues"].paginator.type == "link_header"
    again = run_cli("init", str(tmp_path / "proj"))
    assert again.returncode == 2 and "exists" in again.stderr


def test_schema_describes_every_paginator_partition_and_auth_kind() -> None:
    run = run_cli("schema")
    assert run.returncode == 0
    schema = json.loads(run.stdout)
    assert {"state", "destination", "sources", "streams"} <= set(schema["properties"])
    kinds = {
        d["properties"]["type"]["const"]
        for d in schema["$defs"].values()
        if "type" in d.get("properties", {})
    }
    assert {"next_url", "cursor", "link_header", "offset", "page_number", "single"} <= kinds
    assert {"datetime", "list", "parent"} <= kinds
    assert {"bearer", "basic", "api_key", "oauth2_client_credentials"} <= kinds
    stream = schema["$defs"]["Stream"]
    assert stream["additionalProperties"] is False and "class" in stream["properties"]
