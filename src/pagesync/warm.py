"""A warm pagesync process: Prefect imported once, each `pagesync run` a fork of it.

Importing Prefect costs 2-3 s of CPU per process on a 2-core machine: more than a
one-page sync takes. When a run used the kept local Prefect server (see
`pagesync.embedded`), it leaves behind a process that has imported pagesync and Prefect
and waits on a Unix socket. The next `pagesync run` or `pagesync demo` (this module's
`main()`, the `pagesync` command) connects, hands over its stdin, stdout and stderr, its
arguments, environment, working directory and umask, and the warm process forks a child
that runs the command line exactly as `pagesync ARGS` would, in a fresh copy of the
imported state. The caller waits for the child's exit status and exits with it:

- a signal the caller gets (Ctrl-C, SIGTERM, SIGHUP) is passed on to the child, so a
  run stops at its next page as it would in the caller's own process;
- if the caller dies, even by SIGKILL, its socket closes and the child kills itself
  with SIGKILL too: nothing of a killed run goes on behind the user's back;
- a child killed by a signal makes the caller die of the same signal.

The socket is in Linux's abstract namespace, named after the user, PREFECT_HOME, the
Python, the pagesync code and Prefect installed, and the environment that Python and
Prefect read when imported (PREFECT_*, PYTHON*, LANG, LC_*, TZ): a caller whose
environment, or code, differs from the warm process's finds no socket and runs in its
own process. Only the same user may connect. The warm process leaves when the local
server it came with is gone (`pagesync server stop`, or its idle time) or the code it
imported changed, once no child of it runs. `PAGESYNC_WARM=0` turns it off.

This module is imported before anything else, so its caller's side uses the standard
library alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .prefect_env import prefect_home

if TYPE_CHECKING:
    from .embedded import LocalServer

#: The commands run in a warm child; others are quick without Prefect and run here.
FORWARDED = frozenset({"run", "demo"})
ENV = "PAGESYNC_WARM"
#: The environment read at import by Python (stdio encoding, time zone) and by Prefect.
IMPORT_ENV_PREFIXES = ("PREFECT_", "PYTHON", "LC_")
IMPORT_ENV_NAMES = frozenset({"LANG", "TZ"})
#: How often an idle warm process asks itself whether to leave.
TICK = 1.0
#: The environment this command was started with, before pagesync changed any of it: a
#: warm process started by this run gets exactly this one. None outside the `pagesync`
#: command (e.g. `python -m pagesync.cli`, pagesync used as a library, a warm child).
ORIGINAL_ENV: dict[str, str] | None = None


def enabled(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    return env.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def _code_files() -> list[Path]:
    """pagesync's modules and Prefect's package file: what the warm process imported."""
    from importlib.util import find_spec

    files = []
    for name in ("pagesync", "pagesync.flows", "pagesync.tasks", "pagesync.demo"):
        spec = find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            files.extend(Path(folder).glob("*.py"))
    spec = find_spec("prefect")
    if spec is not None and spec.origin:
        files.append(Path(spec.origin))  # a new Prefect installs a new __init__.py
    return sorted(files)


def _code_stamp() -> str:
    parts = []
    for path in _code_files():
        with contextlib.suppress(OSError):
            st = path.stat()
            parts.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
    return "\n".join(parts)


def address(env: dict[str, str] | os._Environ[str] = os.environ, stamp: str | None = None) -> str:
    """The abstract socket name of the warm process that may run a command in `env`."""
    seen = sorted(
        (k, v) for k, v in env.items() if k.startswith(IMPORT_ENV_PREFIXES) or k in IMPORT_ENV_NAMES
    )
    identity = json.dumps(
        [
            str(prefect_home(env)),
            sys.executable,
            sys.version,
            seen,
            _code_stamp() if stamp is None else stamp,
        ]
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:24]
    return f"\0pagesync-warm-{os.getuid()}-{digest}"


# -- the caller's side ---------------------------------------------------------------------


def main() -> NoReturn:
    """The `pagesync` command: in a warm child when one can run it, else in this process."""
    global ORIGINAL_ENV
    ORIGINAL_ENV = dict(os.environ)
    if len(sys.argv) > 1 and sys.argv[1] in FORWARDED and enabled():
        code = forward(sys.argv[1:])
        if code is not None:
            os._exit(code)
    from .cli import main as cli_main

    cli_main()
    raise AssertionError("pagesync.cli.main() returned")  # it always exits


def forward(args: list[str]) -> int | None:
    """Run `pagesync ARGS` in a warm child; its exit code, or None when no warm process
    took the command (nothing ran: the caller runs it itself)."""
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)  # a closed stdio cannot be handed over
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address())
    except OSError:
        return None
    with conn:
        request = {"args": args, "cwd": os.getcwd(), "env": dict(os.environ),
                   "umask": _umask()}  # fmt: skip
        try:
            socket.send_fds(conn, [b"R"], [0, 1, 2])
            conn.sendall(json.dumps(request).encode() + b"\n")
            replies = conn.makefile("rb")
            started = replies.readline()
        except OSError:
            return None
        if not started:
            return None  # the warm process left before it forked: nothing ran
        pid = int(json.loads(started)["pid"])
        passed = {sig: signal.signal(sig, lambda signum, _f: _pass_on(pid, signum))
                  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}  # fmt: skip
        try:
            ended = replies.readline()
        except OSError:
            ended = b""
        for sig, old in passed.items():
            signal.signal(sig, old)
    if not ended:  # the warm process died; the child may not have
        return _wait_for(pid)
    status = json.loads(ended)
    if "signal" in status:
        signum = int(status["signal"])
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's cannot be set
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return int(status["exit"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_for(pid: int) -> int:
    """Until process `pid` (not our child) ends; its exit status is lost with the warm
    process, so: 1, with a word on stderr."""
    with contextlib.suppress(OSError):
        fd = os.pidfd_open(pid)
        select.select([fd], [], [])
        os.close(fd)
    sys.stderr.write("pagesync: the warm process ended before the run's exit status reached it\n")
    return 1


# -- the warm process ----------------------------------------------------------------------


def start(env: dict[str, str]) -> None:
    """Start a warm process for commands run in `env` (the caller's original environment),
    detached; if one already serves them, it leaves at once."""
    log = prefect_home(env) / "pagesync-warm.log"
    with contextlib.suppress(OSError), log.open("ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "pagesync.warm"], env=env, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )  # fmt: skip


def start_after(server: LocalServer) -> None:
    """At the end of a run on the kept local server `server`: start a warm process for
    the runs after it, unless this run is in one, or it was not started by the `pagesync`
    command, or warm processes are off."""
    if ORIGINAL_ENV is None or not enabled(ORIGINAL_ENV) or server.idle == 0:
        return
    start(ORIGINAL_ENV)


#: What a run imports, imported once here (measured: the rest costs a few milliseconds).
#: Some are imported by Prefect only inside a flow run: fastapi's encoder for the flow's
#: parameters (100 ms), the visualisation helpers, anyio's backend for cancel scopes.
PRELOAD = (
    "prefect",
    "prefect.flows",
    "prefect.flow_engine",
    "prefect.utilities.visualization",
    "fastapi.encoders",
    "anyio._backends._asyncio",
    "encodings.idna",
    "sqlite3",
    "prefect.tasks",
    "prefect.task_engine",
    "prefect.events.worker",
    "prefect.logging.handlers",
    "prefect.client.orchestration",
    "prefect.artifacts",
    "prefect.futures",
    "prefect.task_runners",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "psycopg",
    "sqlmodel",
    "httpx",
    "orjson",
    "typer",
    "rich.live",
    "rich.progress",
    "rich.table",
    "pagesync.cli",
    "pagesync.cli_deploy",
    "pagesync.launch",
    "pagesync.progress",
    "pagesync.flows.stream",
    "pagesync.tasks.pages",
    "pagesync.tasks.partition",
    "pagesync.engine",
    "pagesync.store",
    "pagesync.destination",
    "pagesync.demo.api",
    "pagesync.demo.project",
)


def _complete_models() -> None:
    """Build the pydantic models whose schema waits for their first use (Prefect's client
    schemas: the flow run a run creates, its states): once here, not in every child
    (measured: a one-page run 0.33 s -> 0.23 s)."""
    from pydantic import BaseModel

    todo: list[type[BaseModel]] = [BaseModel]
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if not model.__dict__.get("__pydantic_complete__", True):
            with contextlib.suppress(Exception):  # still unresolvable: left to first use
                model.model_rebuild(raise_errors=False)


def serve() -> int:
    """The warm process: bind the socket (one warm process per name), import, then fork a
    child per request until the local server is gone or the code changed."""
    import gc
    import importlib

    stamp = _code_stamp()
    name = address(os.environ, stamp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
    except OSError:
        return 0  # another warm process serves this name
    listener.listen(16)
    from . import embedded, launch, prefect_env

    # The environment a run gives Prefect, so that a run's child need not set up Prefect's
    # settings and logging again (prefect_env.reload_prefect_settings).
    launch.quiet_prefect(verbose=False)
    files = embedded.ServerFiles(prefect_home())
    if (record := files.read()) is not None:
        os.environ["PREFECT_API_URL"] = str(record["api_url"])
    for module in PRELOAD:
        importlib.import_module(module)
    _complete_models()
    prefect_env.settings_loaded()
    gc.collect()
    gc.freeze()  # the children share these pages instead of copying them when gc runs

    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(TICK):
            if key.fileobj is listener:
                _accept(listener, sel, children)
            else:
                pidfd = int(key.fd)
                sel.unregister(pidfd)
                pid, conn = children.pop(pidfd)
                _report(pid, conn)
                os.close(pidfd)
        if not children and (files.read() is None or _code_stamp() != stamp):
            return 0


def _accept(
    listener: socket.socket, sel: selectors.BaseSelector,
    children: dict[int, tuple[int, socket.socket]],
) -> None:  # fmt: skip
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise PermissionError("another user")
        conn.settimeout(10)
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = json.loads(conn.makefile("rb").readline())
        if len(fds) != 3:
            raise ValueError("expected stdin, stdout and stderr")
    except (OSError, ValueError, KeyError):
        for fd in fds:
            os.close(fd)
        conn.close()  # the caller sees no pid and runs the command itself
        return
    others = [listener.fileno(), *children, *(c.fileno() for _, c in children.values())]
    pid = os.fork()
    if pid == 0:
        try:
            _child(conn, fds, request, others)
        finally:
            os._exit(70)
    for fd in fds:
        os.close(fd)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} forked {pid}: pagesync {request['args'][0]}",
          flush=True)  # fmt: skip
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (pid, conn)
    sel.register(pidfd, selectors.EVENT_READ)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _report(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        reply = {"signal": os.WTERMSIG(status)}
    else:
        reply = {"exit": os.waitstatus_to_exitcode(status)}
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")
    conn.close()


def _child(conn: socket.socket, fds: list[int], request: dict[str, Any], others: list[int]) -> None:
    """In the forked child: become the caller's `pagesync ARGS` process, then run it."""
    for fd in others:
        with contextlib.suppress(OSError):
            os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    _reopen_stdio()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    conn.settimeout(None)
    threading.Thread(target=_die_with_caller, args=(conn,), daemon=True).start()
    sys.argv = ["pagesync", *request["args"]]

    from . import crashpoints

    crashpoints.load()  # this run's PAGESYNC_CRASH_AT
    from .cli import main as cli_main

    try:
        cli_main()  # exits through os._exit
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _reopen_stdio() -> None:
    """Python chose the buffering of stdout when this process started, before it was the
    caller's terminal: open the three again, as Python would for them now."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        buffering = 1 if fd == 2 or os.isatty(fd) else -1
        new = open(  # noqa: SIM115 - stdio lives as long as the process
            fd, "r" if fd == 0 else "w", buffering=buffering, encoding=old.encoding,
            errors=old.errors, closefd=False,
        )  # fmt: skip
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)


def _die_with_caller(conn: socket.socket) -> None:
    """The caller holds the other end: when it closes, the caller is gone (even by
    SIGKILL), and so is this run."""
    with contextlib.suppress(OSError):
        while conn.recv(64):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(serve())
