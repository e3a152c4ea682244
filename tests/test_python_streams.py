"""Streams declared in Python (`class:`), record models (`model:`), and configs extended
in code: the engine's checkpoints, retries and resume apply to them unchanged."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import STREAMS, run_cli, write_config
from helpers import assert_exactly_once, committed_pages, rows

import pagesync
from pagesync.demo.api import DemoAPI

HERE = str(Path(__file__).parent)
PY = {"class": "pystreams:CursorItems", "primary_key": ["id"],
      "cursor": {"field": "updated_at", "param": "updated_at__gte"}}  # fmt: skip


def test_python_stream_syncs_and_resumes_after_sigkill(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": PY})
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
    first = run_cli("run", "items", "-c", str(path), PAGESYNC_CRASH_AT="after_commit:4", **env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    assert committed_pages(db, "items") == 4
    api.clear_requests()
    second = run_cli("run", "items", "-c", str(path), **env)
    assert second.returncode == 0, second.stderr
    assert api.requests[0]["query"]["updated_at__gte"], "resumed from the committed cursor"
    assert_exactly_once(db, "items", [i["id"] for i in api.items])


def test_python_stream_errors_name_the_class_and_page(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": {**PY, "class": "pystreams:Broken"}})
    run = run_cli("run", "items", "-c", str(path), PYTHONPATH=HERE)
    assert run.returncode == 1
    assert "Broken.parse failed: ValueError: the API changed its shape" in run.stderr
    assert "page 1" in run.stderr
    bad = write_config(tmp_path, api.url, {"items": {**PY, "class": "pystreams:Nope"}})
    assert (
        "pystreams has no Nope" in run_cli("run", "items", "-c", str(bad), PYTHONPATH=HERE).stderr
    )


def test_record_model_rejects_into_a_table_and_the_page_still_commits(
    tmp_path: Path, api: DemoAPI
) -> None:
    spec = {**STREAMS["cursor"], "model": "pystreams:Item"}
    path = write_config(tmp_path, api.url, {"items": spec})
    summary = pagesync.sync(str(path), "items")
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    cheap = [i["id"] for i in api.items if i["price"] < 50]
    assert 0 < len(cheap) < len(api.items)
    assert_exactly_once(db, "items", cheap)
    rejected = rows(db, "items__rejected")
    assert sorted(r["record"] and json.loads(r["record"])["id"] for r in rejected) == sorted(
        i["id"] for i in api.items if i["price"] >= 50
    )
    assert all(
        "price" in r["error"] and r["page"] >= 1 and r["partition"] == "all" for r in rejected
    )
    state = json.loads(run_cli("state", "items", "-c", str(path), "--json").stdout)
    assert state[0]["rejected"] == len(rejected) and state[0]["status"] == "complete"
    assert summary["records"] == len(cheap)


def test_config_extended_in_code_runs_with_yaml_streams(tmp_path: Path, api: DemoAPI) -> None:
    path = write_config(tmp_path, api.url, {"items": STREAMS["cursor"]})
    config = pagesync.load_config(path).extend(streams={"code_items": {"source": "shop", **PY}})
    assert set(config.streams) == {"items", "code_items"}
    summary = pagesync.sync(config, "code_items")
    assert summary["records"] == len(api.items)
    assert_exactly_once(
        f"sqlite:///{tmp_path / 'pagesync.db'}", "code_items", [i["id"] for i in api.items]
    )


def test_python_stream_errors_never_show_the_credentials(tmp_path: Path) -> None:
    token = "s3cr3t-python-stream-token"
    with DemoAPI(items=50, token=token) as secured:
        spec = {**PY, "class": "pystreams:Leaky"}
        auth = {"auth": {"type": "bearer", "token": token}}
        path = write_config(tmp_path, secured.url, {"items": spec}, source=auth)
        run = run_cli("run", "items", "-c", str(path), "-v", PYTHONPATH=HERE)
        assert secured.requests[0]["headers"].get("authorization") == f"Bearer {token}"
    assert run.returncode == 1
    assert "Leaky.parse failed: ValueError: cannot parse the answer to" in run.stderr
    assert token not in run.stdout + run.stderr
