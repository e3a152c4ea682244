"""The embedded Prefect server, started before Prefect is imported.

With no Prefect server configured, Prefect starts a temporary one itself when the first
flow run begins: it imports the whole server application into the client (about 3 s of
CPU) and only then starts the server process, which imports it again. Starting the same
server process first, while the client imports Prefect, does the two at once and skips
the client's import: `pagesync run` reaches its first page seconds sooner.

It runs what Prefect's own `SubprocessASGIServer` runs (uvicorn over
`prefect.server.api.server:create_app`, UI off, ephemeral services), on the same
PREFECT_HOME database, so its runs are the ones `prefect server start` shows later. What a
server that lives for one run has no use for is off: automation triggers and the event
feed (the event persister); runs, task runs, logs and artifacts are all kept.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx

#: What Prefect sets for its own temporary server, plus what a one-shot server can skip.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    # Automations are never evaluated by a server that lives as long as one run.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


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
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(profiles.read_text())
    except FileNotFoundError:
        return False
    except (OSError, tomllib.TOMLDecodeError):
        return True
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    profile = data.get("profiles", {}).get(active, {})
    return bool(profile.get("PREFECT_API_URL"))


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


def wait_until_healthy(
    api_url: str, process: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path
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


class EmbeddedServer:
    """A temporary Prefect server process for this one command; stopped at exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        spec = importlib.util.find_spec("prefect")  # its location, without importing it
        app_dir = Path(spec.origin if spec and spec.origin else ".").parent.parent
        home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "pagesync-embedded-server.log"
        with self.log_path.open("wb") as log:  # its shutdown chatter stays out of the CLI
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )  # fmt: skip
        # Registered before Prefect is imported, so it runs after Prefect's own exit
        # handlers have sent their last events and logs to this server.
        atexit.register(self.stop)

    def wait(self, timeout: float) -> None:
        """Until the server answers; a clear error if it exits or never answers."""
        wait_until_healthy(
            self.api_url, self.process, timeout, "the embedded Prefect server "
            "(startup timeout: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)", self.log_path,
        )  # fmt: skip

    def stop(self) -> None:
        """At exit, after Prefect sent its last events and logs: the server shuts down
        gracefully (it flushes what it received) on its own time, not the user's."""
        if self.process.poll() is None:
            self.process.terminate()


def start_if_needed() -> EmbeddedServer | None:
    """Before Prefect is imported: start the embedded server if no server is configured and
    point this process (and Prefect in it) at it."""
    if api_configured():
        return None
    server = EmbeddedServer()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
