"""The local Prefect server pagesync runs when none is configured, kept between runs.

With no Prefect server configured, Prefect starts a temporary one itself for every flow
run: it imports the whole server application into the client (about 3 s of CPU), starts
the server process, which imports it again and checks its migrations, and stops it when
the run ends. pagesync instead starts the same server (Prefect's server app under uvicorn,
UI off, ephemeral services, on PREFECT_HOME's database) before Prefect is imported, and
keeps it: it stays up `PAGESYNC_SERVER_IDLE` seconds (default 600) after the last run
that used it ended, and every `pagesync run` on the same PREFECT_HOME in that time reuses
it instead of paying its start again. `pagesync server stop` ends it;
`PAGESYNC_SERVER_IDLE=0` gives a server that dies with its run, even on SIGKILL.

What a local server has no use for is off: automation triggers and the event feed (the
event persister); runs, task runs, logs and artifacts are all kept, and the task run
recorder writes them in batches (a transaction per batch of events, not per event).

The server is the user's alone: it listens on loopback and asks every request (but the
health check) for Prefect's own API authentication (`server.api.auth_string`), a random
secret written with mode 0600 in `PREFECT_HOME/pagesync-server.secret` when the server
starts; pagesync's runs read it and give it to Prefect as `api.auth_string`, and
`pagesync server status` shows it for the UI's login. (Prefect's `prefect server start
--background` would give a kept server too, but neither leaves when idle nor lets runs
join it under a lock, which is what makes reuse safe here.)

Which server belongs to a PREFECT_HOME is written in `PREFECT_HOME/pagesync-server.json`;
every run using it has a file named after its pid in `pagesync-server.clients/`, and the
server leaves only when none of those processes lives and it has served no request for
the idle time. Both sides decide under one file lock, so a run never joins a server that
is leaving.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from ..core.errors import ConfigError
from ..core.procs import alive
from .settings import UnreadableProfiles, prefect_home, profile

#: What Prefect sets for its own temporary server, plus what a one-shot server can skip.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    # Automations are never evaluated by a server that lives as long as one run.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Task runs reach the server as events, and by default its recorder writes each event
    # in a transaction of its own (select, upsert, select, insert state, commit); in
    # batches it spends about a third less CPU on a page task (measured, 200 pages).
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    # Every request carries the secret in a header (PREFECT_API_AUTH_STRING), which no other
    # site's page can send for the user, so a CSRF token adds nothing; runs skip fetching
    # one per client (`launch._run_flow`).
    "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "false",
}
#: Seconds the local server stays after its last run; 0: it dies with its run.
IDLE_ENV = "PAGESYNC_SERVER_IDLE"
DEFAULT_IDLE = 600.0


def api_configured(cwd: Path | None = None) -> bool:
    """Whether the user pointed Prefect at a server: PREFECT_API_URL in the environment,
    the active profile, or a prefect.toml / .env / pyproject.toml here. When in doubt, yes:
    then Prefect decides, as it would without pagesync."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        return True
    here = cwd or Path.cwd()
    for name in ("prefect.toml", ".env", "pyproject.toml"):
        try:
            text = (here / name).read_text(errors="replace")
        except OSError:
            continue
        if "PREFECT_API_URL" in text or (
            name != ".env" and "[api]" in text.replace("tool.prefect.", "")
        ):
            return True
    try:
        return bool(profile().get("PREFECT_API_URL"))
    except UnreadableProfiles:
        return True


def _die_with_parent() -> None:
    """In the server process (Linux): get SIGTERM when pagesync dies, even by SIGKILL, so
    no orphaned server outlives a killed run."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process(Protocol):
    """What `wait_until_healthy` asks of a server process: Popen's poll() and returncode."""

    returncode: int | None

    def poll(self) -> int | None: ...


def wait_until_healthy(
    api_url: str, process: Process, timeout: float, what: str, log_path: Path
) -> None:
    """Until the Prefect server that `process` runs answers at `api_url`; a RuntimeError
    naming `what` and its log if the process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while True:
            try:
                if client.get(f"{api_url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with code {process.returncode}; its log: {log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer in {timeout:.0f}s; its log: {log_path}")
            time.sleep(0.05)  # polling the server's health endpoint, with a deadline


def idle_timeout() -> float:
    """PAGESYNC_SERVER_IDLE, checked: how long the local server stays after its last run."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise ConfigError(
            f"{IDLE_ENV}={raw!r}: expected seconds >= 0 (0: the server dies with its run)"
        )
    return value


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on `path` for the block; yields False if `wait` is off and the
    lock is taken."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class ServerFiles:
    """Where a PREFECT_HOME's local server is written down, and who uses it."""

    home: Path

    @classmethod
    def here(cls) -> ServerFiles:
        home = prefect_home()
        home.mkdir(parents=True, exist_ok=True)
        return cls(home)

    @property
    def record(self) -> Path:
        return self.home / "pagesync-server.json"

    @property
    def lock(self) -> Path:
        return self.home / "pagesync-server.lock"

    @property
    def clients(self) -> Path:
        return self.home / "pagesync-server.clients"

    @property
    def secret(self) -> Path:
        """The server's API secret (`server.api.auth_string`), readable by its user only."""
        return self.home / "pagesync-server.secret"

    def write_secret(self, value: str) -> None:
        """Write a kept server's secret with mode 0600 from the first byte (created under
        another name, then moved over the old one)."""
        tmp = self.secret.with_name(f".{self.secret.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value)
        tmp.replace(self.secret)

    def read_secret(self) -> str:
        """The running server's secret; a ConfigError naming the file if it cannot be read
        (another user's PREFECT_HOME, say)."""
        try:
            return self.secret.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read the local Prefect server's secret ({e.strerror}); use your own "
                "PREFECT_HOME, or set PREFECT_API_URL", file=str(self.secret),
            ) from None  # fmt: skip

    @property
    def log(self) -> Path:
        return self.home / "pagesync-embedded-server.log"

    @property
    def orphans(self) -> Path:
        """Flow runs of runs that died without ending them (a line each)."""
        return self.home / "pagesync-server.orphans"

    def _recorded(self) -> tuple[dict[str, object], int] | None:
        """The record as written, and its server's pid; None if there is none to read."""
        try:
            rec = json.loads(self.record.read_text())
            return rec, int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read(self) -> dict[str, object] | None:
        """The server written down, if its process still lives (and is a pagesync server:
        a dead server's pid may have gone to another process since)."""
        found = self._recorded()
        if found is None or not alive(found[1]):
            return None
        with contextlib.suppress(OSError):  # no /proc: trust the pid
            if (
                b"pagesync.prefect.server_process"
                not in Path(f"/proc/{found[1]}/cmdline").read_bytes()
            ):
                return None
        return found[0]

    def write(self, rec: dict[str, object]) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        tmp.replace(self.record)

    def forget(self, pid: int) -> None:
        """Remove the record if it still names server `pid`."""
        found = self._recorded()
        if found is not None and found[1] == pid:
            self.record.unlink(missing_ok=True)

    def join(self, pid: int) -> Path:
        self.clients.mkdir(exist_ok=True)
        path = self.clients / str(pid)
        path.touch()
        return path

    def live_clients(self) -> list[int]:
        """Pids of the runs using the server; files of dead ones are removed, the flow
        runs they were running kept in `orphans` (a run that ends leaves none behind)."""
        pids = []
        for path in self.clients.glob("*") if self.clients.is_dir() else []:
            pid = int(path.name) if path.name.isdigit() else 0
            if pid and alive(pid):
                pids.append(pid)
                continue
            with contextlib.suppress(OSError):
                if flow_runs := path.read_text():
                    with self.orphans.open("a") as out:
                        out.write(flow_runs)
            path.unlink(missing_ok=True)
        return pids

    def take_orphans(self) -> list[str]:
        """The flow runs of dead runs (found as `live_clients` finds them), once: the
        caller sees to them."""
        self.live_clients()
        with contextlib.suppress(FileNotFoundError):
            ids = self.orphans.read_text().split()
            self.orphans.unlink()
            return list(dict.fromkeys(ids))
        return []


class _Pid:
    """A process this one did not start, seen through Popen's poll()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not alive(self.pid):
            self.returncode = -1
        return self.returncode


def _identity() -> dict[str, object]:
    """What a reused server must have been started with: this environment and this Prefect,
    and an API that asks for the secret and no CSRF token."""
    return {"python": sys.prefix, "prefect": importlib.metadata.version("prefect"), "auth": 1,
            "csrf": 0}  # fmt: skip


class LocalServer:
    """The Prefect server this run uses: one found running for this PREFECT_HOME, or one
    started now."""

    def __init__(
        self, api_url: str, process: subprocess.Popen[bytes] | _Pid, log_path: Path, *,
        reused: bool, idle: float, secret: str,
    ) -> None:  # fmt: skip
        self.api_url = api_url
        self.secret = secret
        self.process = process
        self.log_path = log_path
        self.reused = reused
        self.idle = idle

    @classmethod
    def start(cls, files: ServerFiles, idle: float) -> LocalServer:
        port = free_port()
        attached = idle == 0
        secret = f"pagesync:{secrets.token_urlsafe(32)}"
        if not attached:  # a server that dies with its run needs it in this process only
            files.write_secret(secret)
        env = {**os.environ, **SERVER_ENV, "PREFECT_SERVER_API_AUTH_STRING": secret}
        with files.log.open("wb") as log:  # its chatter stays out of the CLI
            process = subprocess.Popen(
                [sys.executable, "-m", "pagesync.prefect.server_process", "--port", str(port),
                 "--idle", str(idle), "--home", str(files.home)],
                env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                # Attached: dies with this process. Kept: out of the terminal's process
                # group, so a Ctrl-C meant for the run does not reach it.
                preexec_fn=_die_with_parent if attached else None,
                start_new_session=not attached,
            )  # fmt: skip
        server = cls(f"http://127.0.0.1:{port}/api", process, files.log, reused=False,
                     idle=idle, secret=secret)  # fmt: skip
        if attached:
            # Registered before Prefect is imported, so it runs after Prefect's own exit
            # handlers have sent their last events and logs to this server.
            atexit.register(server.stop)
        else:
            files.write({"pid": process.pid, "port": port, "api_url": server.api_url,
                         "idle": idle, "started": time.time(), **_identity()})  # fmt: skip
        return server

    @classmethod
    def find(cls, files: ServerFiles) -> LocalServer | None:
        """The server written down for this PREFECT_HOME, if it lives and was started from
        this environment with this Prefect (else it is left to leave when idle)."""
        rec = files.read()
        if rec is None or any(rec.get(k) != v for k, v in _identity().items()):
            return None
        return cls(str(rec["api_url"]), _Pid(int(str(rec["pid"]))), files.log,
                   reused=True, idle=float(str(rec["idle"])),
                   secret=files.read_secret())  # fmt: skip

    def wait(self, timeout: float) -> None:
        """Until the server answers; a clear error if it exits or never answers."""
        wait_until_healthy(
            self.api_url, self.process, timeout, "the local Prefect server "
            "(startup timeout: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)", self.log_path,
        )  # fmt: skip

    def stop(self) -> None:
        """At exit, after Prefect sent its last events and logs: the server shuts down
        gracefully (it flushes what it received) on its own time, not the user's."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)


#: This process's file among the kept server's clients, once it joined.
JOINED: Path | None = None
#: Flow runs that runs killed on the kept server left Running (`crash_orphaned_runs`).
ORPHANED: list[str] = []


def start_if_needed() -> LocalServer | None:
    """Before Prefect is imported: unless a server is configured, find or start this
    PREFECT_HOME's local server, join it for as long as this process lives, and point this
    process (and Prefect in it) at it."""
    global JOINED
    if api_configured():
        return None
    idle = idle_timeout()
    files = ServerFiles.here()
    if idle == 0:
        server = LocalServer.start(files, idle)
    else:
        with locked(files.lock):
            server = LocalServer.find(files) or LocalServer.start(files, idle)
            ORPHANED[:] = files.take_orphans()
            JOINED = me = files.join(os.getpid())
        # Registered before Prefect is imported: runs after Prefect's exit handlers.
        atexit.register(me.unlink, missing_ok=True)
    os.environ["PREFECT_API_URL"] = server.api_url
    os.environ["PREFECT_API_AUTH_STRING"] = server.secret
    return server


def note_flow_run(flow_run_id: str) -> None:
    """Write down a flow run this process runs on the kept server: should the process be
    killed, the next run marks it Crashed instead of leaving it Running for ever."""
    if JOINED is not None:
        with contextlib.suppress(OSError), JOINED.open("a") as out:
            out.write(f"{flow_run_id}\n")


def crash_orphaned_runs() -> int:
    """Mark Crashed the flow runs, and their task runs, that killed runs left Running or
    Pending on this server; how many. As Prefect's engine marks a run it sees crash."""
    if not ORPHANED:
        return 0
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    live = [StateType.RUNNING, StateType.PENDING]
    message = "The pagesync process running it was killed before the run ended."
    crashed = 0
    with get_client(sync_client=True) as client:
        for flow_run_id in ORPHANED:
            try:
                flow_run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
            except ObjectNotFound:
                continue
            if flow_run.state is None or flow_run.state.type not in live:
                continue
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
            crashed += 1
            for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=live))
                ),
            ):
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    ORPHANED.clear()
    return crashed


def stop_local_server(
    files: ServerFiles | None = None, timeout: float = 30.0
) -> dict[str, object] | None:
    """Stop the kept server of `files` (default: this PREFECT_HOME's; `pagesync server
    stop`); its record, or None when none runs."""
    files = files or ServerFiles.here()
    rec = files.read()
    if rec is None:
        return None
    pid = int(str(rec["pid"]))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)  # polling a process's exit, with a deadline
    files.forget(pid)
    return rec
