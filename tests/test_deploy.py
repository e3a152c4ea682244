"""Deployments: built from a config, served by `pagesync up`, registered to a work pool by
`pagesync deploy` and run by a real worker, and `deployments/prefect.yaml` accepted by
`prefect deploy`. Against the session's real Prefect server (and, where `up` must start its
own, a fresh one)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import daily_stream, run_cli, write_config
from helpers import (
    assert_exactly_once,
    committed_pages,
    task_runs_of,
    wait_for,
    write_project_code,
)

from pagesync.core.config import load_config
from pagesync.demo.api import DemoAPI
from pagesync.demo.project import write_demo
from pagesync.prefect.local_server import free_port

REPO = Path(__file__).resolve().parent.parent

DAILY = daily_stream(20)
NEVER = {"cron": "0 0 1 1 *"}  # a schedule that will not fire while the tests run


def in_range(api: DemoAPI, start: str, end: str) -> list[int]:
    """Ids of the demo records with start <= updated_at < end."""
    return [i["id"] for i in api.items if start <= i["updated_at"] < end]


class Up:
    """`pagesync up` in a subprocess, as a person would run it; its output kept as it comes."""

    def __init__(self, *args: str, env: dict[str, str | None], cwd: Path) -> None:
        full = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", **env}
        full.pop("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", None)  # up's own default
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagesync.cli", "up", *args],
            env={k: v for k, v in full.items() if v is not None}, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.output:
                raise AssertionError(f"up exited {self.proc.returncode}:\n{self.output}")
            return text in self.output

        try:
            wait_for(seen, timeout, what=repr(text))
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- up's output:\n{self.output}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def __enter__(self) -> Up:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_final(flow_run_id: Any, timeout: float = 120) -> Any:
    """The flow run once it reached a final state (polled through the API)."""
    with client() as c:

        def final() -> Any:
            run = c.read_flow_run(flow_run_id)
            return run if run.state and run.state.is_final() else None

        return wait_for(final, timeout, what=f"flow run {flow_run_id} to finish")


def assert_stopped_at_page_boundaries(flow_run_id: Any) -> None:
    """A flow run stopped by SIGTERM (Cancel, a worker's or runner's stop) left no task run
    Running: its partitions ended after their pages in progress, and every page or
    partition that did not finish says it was stopped."""
    with client() as c:  # the server records task runs from their events, a moment later
        runs = wait_for(
            lambda: (r := task_runs_of(c, flow_run_id)) and all(t.state.is_final() for t in r)
            and r, 60, what="every task run of the stopped flow run in a final state",
        )  # fmt: skip
    unfinished = [t.state.message or "" for t in runs if not t.state.is_completed()]
    assert unfinished and all("stopped (SIGTERM)" in m for m in unfinished), unfinished


# -- built from a config ----------------------------------------------------------------


@pytest.mark.floor
def test_deployments_built_from_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    from pagesync.prefect.deploy import build_deployments, entrypoint, form_schema, stream_flow

    streams = {
        "hourly": {**DAILY, "schedule": {"cron": "0 * * * *"}},
        "every15": {**DAILY, "schedule": {"interval": 900}},
        "adhoc.v2": DAILY,
    }
    path = write_config(tmp_path, "http://127.0.0.1:9", streams, source={"concurrency": 3})
    cfg = load_config(path)
    deployments = {(d.flow_name, d.name): d for d in build_deployments(cfg)}
    assert set(deployments) == {(s, k) for s in streams for k in ("incremental", "backfill")}
    for (stream, kind), d in deployments.items():
        assert d.parameters == {"stream": stream, "config": str(path.resolve())}
        assert d.entrypoint == entrypoint(stream) and d.entrypoint.startswith(
            "pagesync.prefect.deploy."
        )
        assert d.work_pool_name is None and d.job_variables == {} and d.paused is False
        assert {"pagesync", f"stream:{stream}", kind} <= set(d.tags)
        assert stream in (d.description or "")
    [cron] = deployments["hourly", "incremental"].schedules or []
    assert getattr(cron.schedule, "cron", None) == "0 * * * *"
    [interval] = deployments["every15", "incremental"].schedules or []
    assert getattr(interval.schedule, "interval", None) == timedelta(seconds=900)
    assert not deployments["adhoc.v2", "incremental"].schedules
    assert not any(d.schedules for (_, kind), d in deployments.items() if kind == "backfill")

    # The run forms: typed, described (from the flow's docstring), backfill ranges required.
    flow = stream_flow("hourly", cfg)
    backfill = form_schema(flow, "backfill").model_dump(exclude_unset=True)
    props = backfill["properties"]
    assert list(props) == ["start", "end", "backfill_id"]
    assert backfill["required"] == ["start", "end"]
    assert props["start"]["type"] == "string" and props["start"]["format"] == "date-time"
    assert props["end"]["format"] == "date-time" and props["backfill_id"]["type"] == "string"
    assert "inclusive" in props["start"]["description"]
    assert "exclusive" in props["end"]["description"]
    assert "resumes" in props["backfill_id"]["description"]
    incremental = form_schema(flow, "incremental").model_dump(exclude_unset=True)
    assert incremental["properties"]["full_refresh"]["type"] == "boolean"
    assert list(incremental["properties"]) == ["full_refresh"] and incremental["required"] == []
    # ... and they are what the deployments register (a guarded private attribute).
    registered = deployments["hourly", "backfill"]._parameter_openapi_schema
    assert list(registered.properties) == ["start", "end", "backfill_id"]

    # What a runner or worker loads from the entrypoint: the stream's own flow, named after
    # it, with its source's concurrency from the config that PAGESYNC_CONFIG names.
    monkeypatch.setenv("PAGESYNC_CONFIG", str(path))
    for stream in streams:
        loaded = load_flow_from_entrypoint(entrypoint(stream))
        assert loaded.name == stream and loaded.flow_run_name == stream
        assert loaded.task_runner._max_workers == 3  # type: ignore[attr-defined]


@pytest.mark.floor
def test_a_prefect_without_the_form_attribute_keeps_its_full_form(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a Prefect release move the deployment's parameter schema, registering still
    works: the form keeps Prefect's own schema, and a warning says so."""
    from prefect.utilities.callables import ParameterSchema

    from pagesync.prefect.deploy import _set_form

    class Moved:  # a deployment whose schema lives elsewhere
        flow_name, name = "items", "backfill"

    moved = Moved()
    # Straight to caplog's handler: importing Prefect first in this process (this test run
    # alone) sets up its logging, which replaces the root logger's handlers, caplog's too.
    log = logging.getLogger("pagesync")
    log.addHandler(caplog.handler)
    try:
        _set_form(moved, ParameterSchema())  # type: ignore[arg-type]
    finally:
        log.removeHandler(caplog.handler)
    assert not hasattr(moved, "_parameter_openapi_schema")
    assert "shows every flow parameter" in caplog.text


# -- pagesync up ----------------------------------------------------------------------


def test_up_serves_a_backfill_triggered_through_the_api_and_stops_on_sigterm(
    tmp_path: Path, api: DemoAPI, prefect_api_url: str
) -> None:
    stream = f"up_{uuid.uuid4().hex[:6]}"
    code = write_project_code(tmp_path)  # found beside the config, not on sys.path
    path = write_config(tmp_path, api.url, {stream: {**DAILY, "schedule": NEVER, **code}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Up("-c", str(path), env={"PREFECT_API_URL": prefect_api_url}, cwd=elsewhere) as up:
        up.wait_for("Ctrl-C stops the runner.")
        assert f"{stream}/backfill" in up.output and "(already running)" in up.output
        with client() as c:
            incremental = c.read_deployment_by_name(f"{stream}/incremental")
            backfill = c.read_deployment_by_name(f"{stream}/backfill")
        assert incremental.entrypoint == backfill.entrypoint == f"pagesync.prefect.deploy.{stream}"
        assert [s.schedule.cron for s in incremental.schedules] == [NEVER["cron"]]  # type: ignore[union-attr]
        assert backfill.schedules == [] and not incremental.paused
        assert backfill.parameters == {"stream": stream, "config": str(path.resolve())}
        schema = backfill.parameter_openapi_schema or {}
        assert set(schema["properties"]) == {"start", "end", "backfill_id"}
        assert schema["required"] == ["start", "end"]
        assert all(p["description"] for p in schema["properties"].values())

        with client() as c:
            run = c.create_flow_run_from_deployment(
                backfill.id, parameters={"start": "2024-01-03T00:00:00Z", "end": "2024-01-05T00:00:00Z"}
            )  # fmt: skip
        done = wait_final(run.id)
        assert done.state.is_completed(), done.state
        with client() as c:
            assert c.read_flow(done.flow_id).name == stream  # the stream's own flow...
        assert done.name == stream  # ...and its run name
        ids = in_range(api, "2024-01-03", "2024-01-05")
        assert_exactly_once(f"sqlite:///{tmp_path / 'pagesync.db'}", stream, ids)
        up.wait_for(f"✓ {stream}/backfill: run {str(run.id)[:8]} completed")

        code = up.stop(signal.SIGTERM)
    assert code == 0, up.output
    assert up.output.rstrip().endswith("Stopped.")
    assert "Traceback" not in up.output and "Error" not in up.output
    with client() as c:  # a stopped runner pauses its schedules: no runs pile up unserved
        assert c.read_deployment_by_name(f"{stream}/incremental").paused


def _server_pids(port: int) -> list[int]:
    """Processes serving a Prefect server on `port` (what `up` started), by their id."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in cmd and b"--port" in cmd and str(port).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def test_up_starts_its_own_server_when_none_answers_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "prefect-home"  # a fresh machine: no profile, no database yet
    path = write_config(tmp_path, "http://127.0.0.1:9", {"own": {**DAILY, "schedule": NEVER}})
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": None}
    url = f"http://127.0.0.1:{port}"
    try:
        with Up("-c", str(path), "--port", str(port), env=env, cwd=tmp_path) as up:
            up.wait_for("Ctrl-C stops the runner and the server.", timeout=300)
            assert f"Starting a Prefect server at {url}/api" in up.output
            assert f"Prefect API {url}/api (started by pagesync)" in up.output
            assert f"UI: {url}" in up.output
            # The UI talks to this server (not to a default port).
            assert httpx.get(f"{url}/ui-settings").json()["api_url"] == f"{url}/api"
            found = httpx.post(f"{url}/api/deployments/filter", json={}).json()
            assert {d["name"] for d in found} == {"incremental", "backfill"}
            assert (home / "prefect.db").exists()  # SQLite, in its own PREFECT_HOME
            code = up.stop(signal.SIGTERM)
        assert code == 0, up.output
        assert "Stopping the Prefect server pagesync started" in up.output
        assert "Traceback" not in up.output
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/api/health")
        assert _server_pids(port) == []
    finally:
        for pid in _server_pids(port):  # never leave a server behind, whatever failed
            os.kill(pid, signal.SIGKILL)


def test_up_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "pagesync.yaml"
    path.write_text("sources: {}\nstreams: {x: {source: nope, path: /, primary_key: [id]}}\n")
    run = run_cli("up", "-c", str(path))
    assert run.returncode == 2
    assert "streams.x.source" in run.stderr and "Traceback" not in run.stderr


# -- pagesync deploy, a real worker, and prefect.yaml ---------------------------------------


@contextmanager
def work_pool() -> Iterator[str]:
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"pagesync-test-{uuid.uuid4().hex[:6]}"
    with client() as c:
        c.create_work_pool(WorkPoolCreate(name=name, type="process"))
    try:
        yield name
    finally:
        with client() as c:
            c.delete_work_pool(name)


@pytest.mark.floor
def test_deploy_registers_to_a_work_pool_and_a_worker_runs_the_stream(
    tmp_path: Path, api: DemoAPI, prefect_api_url: str
) -> None:
    stream = f"pool_{uuid.uuid4().hex[:6]}"
    code = write_project_code(tmp_path)  # found beside the config, not on sys.path
    path = write_config(tmp_path, api.url, {stream: {**DAILY, "schedule": NEVER, **code}})
    with work_pool() as pool:
        run = run_cli("deploy", "-c", str(path), "--pool", pool)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"2 deployments of {path.resolve()} registered to work pool {pool}" in run.stdout
        with client() as c:
            backfill = c.read_deployment_by_name(f"{stream}/backfill")
            incremental = c.read_deployment_by_name(f"{stream}/incremental")
        for d in (backfill, incremental):
            assert d.work_pool_name == pool and d.entrypoint == f"pagesync.prefect.deploy.{stream}"
            assert d.job_variables == {"env": {"PAGESYNC_CONFIG": str(path.resolve())}}
            assert d.parameters == {"stream": stream, "config": str(path.resolve())}

        # A process worker started elsewhere, without PAGESYNC_CONFIG, runs the backfill:
        # it loads the stream's flow from the entrypoint in a fresh process.
        with client() as c:
            flow_run = c.create_flow_run_from_deployment(
                backfill.id, parameters={"start": "2024-01-10T00:00:00Z", "end": "2024-01-11T00:00:00Z"}
            )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PAGESYNC_CONFIG"}
        worker = subprocess.run(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
            env=env, cwd=tmp_path.parent, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stdout + worker.stderr
        done = wait_final(flow_run.id, timeout=60)
        assert done.state.is_completed(), worker.stdout + worker.stderr
        with client() as c:
            assert c.read_flow(done.flow_id).name == stream
        ids = in_range(api, "2024-01-10", "2024-01-11")
        assert_exactly_once(f"sqlite:///{tmp_path / 'pagesync.db'}", stream, ids)

        missing = run_cli("deploy", "-c", str(path), "--pool", "no-such-pool")
        assert missing.returncode == 2 and "work pool 'no-such-pool' not found" in missing.stderr
        assert "Traceback" not in missing.stderr
    down = run_cli(
        "deploy", "-c", str(path), "--pool", pool, PREFECT_API_URL="http://127.0.0.1:9/api"
    )
    assert down.returncode == 1 and "no Prefect server answers at" in down.stderr
    assert "Traceback" not in down.stderr


def test_cancelled_in_the_ui_a_workers_run_stops_keeping_its_pages_and_a_rerun_resumes(
    tmp_path: Path, api: DemoAPI, prefect_api_url: str
) -> None:
    """Cancel on a running backfill's flow run (what the UI's Cancel button asks of the API:
    the state Cancelling) while a process worker runs it: the worker stops the run's
    process, whose partitions end after their pages in progress; the flow run ends
    Cancelled, no task run is left Running, the pages it committed stay, and the same
    backfill run again fetches only the pages that were not committed: every record once."""
    import psutil
    from prefect.states import Cancelling

    stream = f"cancel_{uuid.uuid4().hex[:6]}"
    path = write_config(tmp_path, api.url, {stream: {**daily_stream(5), "schedule": NEVER}})
    db = f"sqlite:///{tmp_path / 'pagesync.db'}"
    window = {"start": "2024-01-10T00:00:00Z", "end": "2024-01-11T00:00:00Z"}
    api.add_fault(kind="slow", delay=2.0, times=-1, after=3)  # slow from the 4th request
    with work_pool() as pool:
        assert run_cli("deploy", "-c", str(path), "--pool", pool).returncode == 0
        with client() as c:
            backfill = c.read_deployment_by_name(f"{stream}/backfill")
            flow_run = c.create_flow_run_from_deployment(backfill.id, parameters=window)
        env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                env=env, cwd=tmp_path.parent, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for(lambda: committed_pages(db, stream) >= 2, timeout=180, what="2 pages")
            with client() as c:
                c.set_flow_run_state(flow_run.id, Cancelling())  # as the UI asks it
            done = wait_final(flow_run.id, timeout=120)
            assert done.state.is_cancelled(), (tmp_path / "worker.log").read_text()
            wait_for(lambda: not psutil.Process(worker.pid).children(recursive=True),
                     timeout=60, what="the run's process to end")  # fmt: skip
            assert worker.poll() is None  # the worker goes on
            assert_stopped_at_page_boundaries(flow_run.id)
        finally:
            worker.terminate()
            worker.wait(60)
    kept = committed_pages(db, stream)
    assert kept >= 2
    api.clear_faults()
    again = run_cli("backfill", stream, "--start", window["start"], "--end", window["end"],
                    "-c", str(path))  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert_exactly_once(db, stream, in_range(api, "2024-01-10", "2024-01-11"))
    pages = json.loads(run_cli("history", stream, "-c", str(path), "--json").stdout)
    first = sorted(p["page"] for p in pages if p["flow_run_id"] == str(flow_run.id))
    rest = sorted(p["page"] for p in pages if p["flow_run_id"] != str(flow_run.id))
    assert first == list(range(1, kept + 1)) and rest[0] == kept + 1, (first, rest)


def test_prefect_yaml_deploys_what_pagesync_deploy_builds(tmp_path: Path) -> None:
    """`prefect deploy --all` accepts deployments/prefect.yaml and registers the demo config's
    deployments as `pagesync deploy` builds them: names, entrypoints, schedules, parameters."""
    from pagesync.prefect.deploy import build_deployments

    config = write_demo(tmp_path / "demo")
    expected = build_deployments(load_config(config), work_pool="x")
    with work_pool() as pool:
        env = {**os.environ, "PAGESYNC_CONFIG": str(config.resolve()), "PAGESYNC_WORK_POOL": pool}
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
             "--prefect-file", str(REPO / "deployments" / "prefect.yaml")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        with client() as c:
            for want in expected:
                got = c.read_deployment_by_name(f"{want.flow_name}/{want.name}")
                where = f"{want.flow_name}/{want.name}"
                assert got.work_pool_name == pool, where
                assert got.entrypoint == want.entrypoint, where
                assert got.parameters == want.parameters, where
                assert set(got.tags) == set(want.tags), where
                assert got.job_variables == want.job_variables, where
                assert _schedules(got.schedules) == _schedules(want.schedules or []), where
                # `prefect deploy` takes the whole flow signature for the run form.
                assert {"start", "end", "backfill_id"} <= set(
                    (got.parameter_openapi_schema or {})["properties"]
                ), where
            for want in expected:  # leave the shared server as we found it
                c.delete_deployment(c.read_deployment_by_name(f"{want.flow_name}/{want.name}").id)


def _schedules(schedules: list[Any]) -> list[tuple[str | None, float | None]]:
    out = []
    for s in schedules:
        interval = getattr(s.schedule, "interval", None)
        out.append((getattr(s.schedule, "cron", None), interval and interval.total_seconds()))
    return out
