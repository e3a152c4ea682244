"""After a run on the kept local server, a warm pagesync process (Prefect imported) runs
the next `pagesync run` in a fork of itself: the caller's stdio, exit status and signals
pass through, and a caller killed with SIGKILL takes its run with it. Real processes:
`python -m pagesync` is the `pagesync` command, on a new PREFECT_HOME."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import STREAMS, write_config
from helpers import assert_exactly_once, wait_for
from test_local_server import _env, _processes_with_home

from pagesync.demo.api import DemoAPI
from pagesync.procs import alive


def _pagesync(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagesync", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def _warm(home: Path) -> tuple[list[int], list[int]]:
    """The warm processes of `home`, and the children they forked (runs)."""
    pids = []
    for pid in _processes_with_home(home):
        try:
            if b"pagesync.warm" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    servers = [p for p in pids if _ppid(p) not in pids]
    return servers, [p for p in pids if p not in servers]


def _forks(home: Path) -> list[str]:
    """The commands the warm process forked, from its log."""
    log = home / "pagesync-warm.log"
    text = log.read_text() if log.exists() else ""
    return [line.split(": ", 1)[1] for line in text.splitlines() if " forked " in line]


def test_a_warm_process_runs_the_next_runs_and_dies_with_its_server(
    tmp_path: Path, api: DemoAPI
) -> None:
    home = tmp_path / "prefect-home"
    env = _env(home)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_config(tmp_path / "first", api.url, {"items": STREAMS["next_url"]})
    done = _pagesync(env, "run", "items", "-c", str(first))
    assert done.returncode == 0, done.stdout + done.stderr
    (warm,) = wait_for(lambda: _warm(home)[0], 120, what="a warm process")

    # A run through it, killed with SIGKILL mid-run: the fork dies with its caller.
    second = write_config(tmp_path / "second", api.url, {"items": STREAMS["next_url"]})
    api.clear_requests()
    api.add_fault(kind="slow", delay=120, after=3, times=1)
    caller = subprocess.Popen(
        [sys.executable, "-m", "pagesync", "run", "items", "-c", str(second)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    (child,) = wait_for(lambda: _warm(home)[1], 120, what="the run forked by the warm process")
    assert _ppid(child) == warm
    wait_for(lambda: len(api.requests) >= 3, 120, what="three pages")
    caller.send_signal(signal.SIGKILL)
    assert caller.wait(60) == -signal.SIGKILL
    wait_for(lambda: not alive(child), 30, what="the forked run to die with its caller")
    api.clear_faults()

    # The next run, forked again, resumes: every record exactly once; stderr reaches us.
    resumed = _pagesync(env, "run", "items", "-c", str(second))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "using the local Prefect server" in resumed.stderr
    assert "✓ items" in resumed.stdout
    assert_exactly_once(
        f"sqlite:///{tmp_path / 'second' / 'pagesync.db'}", "items", [i["id"] for i in api.items]
    )
    assert _warm(home)[0] == [warm]
    assert _forks(home) == ["pagesync run"] * 2  # the killed run and this one

    # Exit codes and errors pass through; a crash point's SIGKILL kills the caller too.
    bad = _pagesync(env, "run", "nosuch", "-c", str(second))
    assert bad.returncode == 2 and "unknown stream 'nosuch'" in bad.stderr, bad.stderr
    crashed = _pagesync({**env, "PAGESYNC_CRASH_AT": "plan:1"}, "run", "items", "-c", str(second))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert _forks(home) == ["pagesync run"] * 4  # both ran in the warm process

    stopped = _pagesync(env, "server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not alive(warm), 30, what="the warm process to follow its server")


def test_a_different_environment_or_warm_off_runs_in_its_own_process(
    tmp_path: Path, api: DemoAPI
) -> None:
    home = tmp_path / "prefect-home"
    env = _env(home)
    path = write_config(tmp_path, api.url, {"items": STREAMS["next_url"]})
    assert _pagesync(env, "run", "items", "-c", str(path)).returncode == 0
    (warm,) = wait_for(lambda: _warm(home)[0], 120, what="a warm process")
    for changed in ({"PAGESYNC_WARM": "0"}, {"PREFECT_LOGGING_LEVEL": "DEBUG"}):
        api.clear_requests()
        api.add_fault(kind="slow", delay=120, times=1)
        caller = subprocess.Popen(
            [sys.executable, "-m", "pagesync", "run", "items", "-c", str(path), "--full-refresh"],
            env={**env, **changed}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_for(lambda: api.requests, 120, what="the run's first request")  # noqa: B023
        assert _warm(home)[1] == [], changed  # no fork: the caller runs it itself
        assert len(os.listdir(f"/proc/{caller.pid}/task")) > 1  # its flow's threads
        caller.send_signal(signal.SIGKILL)
        assert caller.wait(60) == -signal.SIGKILL
        api.clear_faults()
    assert _pagesync(env, "server", "stop").returncode == 0
    wait_for(lambda: not alive(warm), 30, what="the warm process to follow its server")
    assert not os.path.exists(home / "pagesync-server.json")
    assert _forks(home) == []


def test_the_warm_process_builds_the_schemas_prefect_defers() -> None:
    """In a fresh interpreter with what the warm process imports, Prefect's flow run
    schema is still unbuilt; after `_complete_models` it is, so no child builds it."""
    code = (
        "import importlib\n"
        "from pagesync import warm\n"
        "for m in warm.PRELOAD: importlib.import_module(m)\n"
        "from prefect.client.schemas.actions import FlowRunCreate\n"
        "before = FlowRunCreate.__pydantic_complete__\n"
        "warm._complete_models()\n"
        "print(before, FlowRunCreate.__pydantic_complete__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
