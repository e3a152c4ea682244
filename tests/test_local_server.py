"""With no Prefect settings at all, `pagesync run` finds or starts a local Prefect server on
PREFECT_HOME, keeps it for later runs, and never lets it outlive its idle time (or, with
PAGESYNC_SERVER_IDLE=0, its run, even one killed with SIGKILL). Real processes throughout:
each test starts a real server on a new PREFECT_HOME, migrations and all."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STREAMS, write_config
from helpers import assert_exactly_once, wait_for

from pagesync.core.procs import alive
from pagesync.demo.api import DemoAPI


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PAGESYNC_"))}
    return {**env, "PREFECT_HOME": str(home), **extra}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagesync.cli", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _popen(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pagesync.cli", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _processes_with_home(home: Path) -> list[int]:
    """Processes whose environment names this PREFECT_HOME (runs and their server)."""
    marker = f"PREFECT_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def _record(home: Path) -> dict[str, object]:
    return json.loads((home / "pagesync-server.json").read_text())


def _flow_run_states(home: Path, flow: str) -> list[str]:
    with sqlite3.connect(home / "prefect.db") as db:
        return [s for (s,) in db.execute(
            "SELECT state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow.name = ? ORDER BY flow_run.created", (flow,)
        )]  # fmt: skip


def test_a_fresh_machine_gets_a_server_that_later_runs_reuse(tmp_path: Path, api: DemoAPI) -> None:
    """No PREFECT_API_URL, a new PREFECT_HOME: the first run starts the server, a run killed
    with SIGKILL leaves it up, the next run reuses it and resumes; `server stop` ends it."""
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    env = _env(home)

    killed = _cli({**env, "PAGESYNC_CRASH_AT": "after_commit:3"}, "run", "items", "-c", str(path))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "starting a local Prefect server" in killed.stderr
    first = _record(home)
    assert alive(int(str(first["pid"])))  # kept: the run died, its server did not

    done = _cli(env, "run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"using the local Prefect server at {first['api_url']}" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert _record(home)["pid"] == first["pid"]
    assert_exactly_once(
        f"sqlite:///{tmp_path / 'pagesync.db'}", "items", [i["id"] for i in api.items]
    )
    status = json.loads(_cli(env, "server", "status", "--json").stdout)
    assert status["running"] is True and status["pid"] == first["pid"]
    assert status["clients"] == []  # both runs are gone: nobody holds the server

    user = home / "pagesync-server.clients" / str(os.getpid())  # a live process using it
    user.touch()
    refused = _cli(env, "server", "stop")
    assert refused.returncode == 1 and f"in use by running pagesync processes ({os.getpid()})" \
        in refused.stderr, refused.stdout + refused.stderr  # fmt: skip
    assert alive(int(str(first["pid"])))
    user.unlink()
    stopped = _cli(env, "server", "stop")
    assert stopped.returncode == 0 and str(first["pid"]) in stopped.stdout, stopped.stderr
    assert not alive(int(str(first["pid"])))
    assert not (home / "pagesync-server.json").exists()
    states = _flow_run_states(home, "items")  # the server kept both runs in PREFECT_HOME
    assert len(states) == 2 and states[-1] == "COMPLETED", states
    wait_for(lambda: not _processes_with_home(home), 30, what="every process of this home to exit")
    again = _cli(env, "server", "stop")
    assert again.returncode == 0 and "No local Prefect server" in again.stdout


def test_runs_started_together_share_one_server(tmp_path: Path, api: DemoAPI) -> None:
    """Two first runs at once on a new PREFECT_HOME: one starts the server, the other
    joins it (decided under a file lock), and both complete."""
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"a": STREAMS["next_url"], "b": STREAMS["cursor"]})
    env = _env(home)
    procs = [_popen(env, "run", name, "-c", str(path)) for name in ("a", "b")]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, out + err
    errs = " ".join(err for _, _, err in results)
    assert errs.count("starting a local Prefect server") == 1, errs
    url = str(_record(home)["api_url"])
    assert f"using the local Prefect server at {url}" in errs
    servers = [p for p in _processes_with_home(home) if b"pagesync.prefect.server_process" in
               Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
    assert servers == [_record(home)["pid"]]
    assert _cli(env, "server", "stop").returncode == 0


def test_with_idle_zero_the_server_dies_with_its_run(tmp_path: Path, api: DemoAPI) -> None:
    """PAGESYNC_SERVER_IDLE=0: the server lives as long as its run, even one killed with
    SIGKILL, and nothing is written down for later runs."""
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    env = _env(home, PAGESYNC_SERVER_IDLE="0")
    killed = _cli({**env, "PAGESYNC_CRASH_AT": "after_commit:2"}, "run", "items", "-c", str(path))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "using a local Prefect server for this run" in killed.stderr
    wait_for(lambda: not _processes_with_home(home), 30, what="the run's server to exit")
    assert not (home / "pagesync-server.json").exists()


def test_the_local_server_asks_no_csrf_token_whatever_the_users_server_settings(
    tmp_path: Path, api: DemoAPI
) -> None:
    """Runs on the local server fetch no CSRF token (a request per Prefect client saved); a
    user's PREFECT_SERVER_CSRF_PROTECTION_ENABLED, meant for their own servers, does not
    reach the local server, whose API asks for the secret instead."""
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    env = _env(home, PAGESYNC_SERVER_IDLE="0", PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true")
    done = _cli(env, "run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_exactly_once(
        f"sqlite:///{tmp_path / 'pagesync.db'}", "items", [i["id"] for i in api.items]
    )


def test_a_kept_server_leaves_after_its_idle_time(tmp_path: Path, api: DemoAPI) -> None:
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    env = _env(home, PAGESYNC_SERVER_IDLE="1")
    done = _cli(env, "run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kept 1 s after the last run" in done.stderr, done.stderr
    wait_for(lambda: not _processes_with_home(home), 60, what="the idle server to leave")
    assert not (home / "pagesync-server.json").exists()


def test_a_bad_idle_setting_is_a_clear_error(tmp_path: Path, api: DemoAPI) -> None:
    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    bad = _cli(_env(home, PAGESYNC_SERVER_IDLE="soon"), "run", "items", "-c", str(path))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "PAGESYNC_SERVER_IDLE='soon'" in bad.stderr and "Traceback" not in bad.stderr
    assert not _processes_with_home(home)


def test_a_record_naming_another_process_is_no_server(tmp_path: Path) -> None:
    """A server that died without a word, its pid since given to some other process: the
    record is not believed, so the next run starts a server instead of waiting on it."""
    from pagesync.prefect.local_server import ServerFiles

    files = ServerFiles(tmp_path)
    files.write({"pid": os.getpid(), "api_url": "http://127.0.0.1:9/api"})  # pytest, alive
    assert files.read() is None


def test_runs_on_the_local_server_skip_heartbeats_version_checks_and_csrf_tokens(
    prefect_api_url: str,
) -> None:
    """Heartbeats only serve automations, which the local server does not run; joining
    their thread cost up to a second per run. The version check asks a server that runs
    this very Prefect. Elsewhere the user's settings stand."""
    from prefect import flow
    from prefect.settings import get_current_settings

    from pagesync.cli.launch import _run_flow

    def asked() -> tuple[int | None, bool, bool]:
        settings = get_current_settings()
        client = settings.client
        return (settings.flows.heartbeat_frequency, client.server_version_check_enabled,
                client.csrf_support_enabled)  # fmt: skip

    @flow(persist_result=False)
    def settings_seen() -> tuple[int | None, bool, bool]:
        return asked()

    before = asked()
    assert before[0] is not None and before[1:] == (True, True)  # Prefect's defaults
    assert tuple(_run_flow(settings_seen, local=True)) == (None, False, False)
    assert tuple(_run_flow(settings_seen, local=False)) == before
    assert asked() == before


def test_runs_keep_the_garbage_collector_out_of_the_page_loop() -> None:
    import gc

    from pagesync.cli.launch import GC_THRESHOLD, quiet_gc

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        quiet_gc()
        assert gc.get_threshold() == (GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > frozen  # what is imported is no longer scanned
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_a_run_is_set_up_for_speed(tmp_path: Path, api: DemoAPI) -> None:
    """A real `pagesync run`, asked at its exit: its TLS contexts load their authorities
    lazily (installed by the command, before any client); the collector keeps out of
    the page loop (set by the run itself) but is on again after the imports; one engine
    for its database although a thread made it while the flow run was created; FastAPI,
    which Prefect's parameter encoder imports, never imported."""
    from pagesync.cli.launch import GC_THRESHOLD

    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    code = (
        "import atexit, gc, ssl, sys\n"
        "from pagesync import cli\n"
        "from pagesync.core import store\n"
        "atexit.register(lambda: print('AT-EXIT', type(ssl.create_default_context()).__name__,"
        " gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.isenabled(), len(store._ENGINES),"
        " 'fastapi' in sys.modules))\n"
        f"sys.argv = ['pagesync', 'run', 'items', '-c', {str(path)!r}]\n"
        "cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [x for x in done.stdout.splitlines() if x.startswith("AT-EXIT")]
    assert line.split()[1:] == ["LazyCAContext", str(GC_THRESHOLD), "True", "True", "1", "False"]


@pytest.mark.floor
def test_the_kept_server_answers_its_user_only(tmp_path: Path, api: DemoAPI) -> None:
    """The kept server asks every API request for the secret pagesync wrote, mode 0600, in
    PREFECT_HOME; runs use it, `server status` shows it, and it is nowhere else: not in
    the run's output, the server's log or its database."""
    import base64
    import stat

    import httpx

    home = tmp_path / "prefect-home"
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    env = _env(home)
    done = _cli(env, "run", "items", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    secret_file = home / "pagesync-server.secret"
    secret = secret_file.read_text().strip()
    assert len(secret) > 40 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    url = str(_record(home)["api_url"])

    anonymous = httpx.post(f"{url}/flow_runs/filter", json={}, timeout=30)
    wrong = httpx.post(f"{url}/flow_runs/filter", json={}, timeout=30, auth=("pagesync", "x"))
    token = base64.b64encode(secret.encode()).decode()
    own = httpx.post(
        f"{url}/flow_runs/filter", json={}, timeout=30, headers={"Authorization": f"Basic {token}"}
    )
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert own.status_code == 200 and [r["name"] for r in own.json()] == ["items"]

    again = _cli(env, "run", "items", "-c", str(path))  # reuses it, with the secret
    assert again.returncode == 0 and "using the local Prefect server" in again.stderr, again.stderr
    status = json.loads(_cli(env, "server", "status", "--json").stdout)
    assert status["auth_string"] == secret and status["api_url"] == url
    assert secret in _cli(env, "server", "status").stdout

    stopped = _cli(env, "server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    for out in (done.stdout, done.stderr, again.stdout, again.stderr, stopped.stdout):
        assert secret not in out
    token_forms = {secret.encode(), token.encode()}
    for file in home.rglob("*"):
        if file.is_file() and file != secret_file:
            data = file.read_bytes()
            assert not any(form in data for form in token_forms), file
