"""Run one command and measure it: wall time, peak RSS of its process tree, CPU by role.

Every scenario goes through `measure()`, so the raw loop and pagesync are measured by the
same code. How:

- A sampler thread walks the process tree (the process and all its descendants) every
  `interval` seconds (50 ms) and records the sum of their RSS, and each process's CPU time
  and role: "server" for a Prefect server the run started itself (`--cold`: a child
  running `pagesync.prefect.server_process`), "client" for the command's own process, "other" for any
  other descendant.
- When the command exits, it is left a zombie for a moment (`waitid(WNOWAIT)`): its exact
  CPU time, and that of the children it reaped (the embedded server is stopped and reaped
  at exit), are read from the kernel before the process is reaped. The sampled server CPU
  only serves when the server was not reaped by its parent.
- Processes the command does not own (the demo API) are given in `watch`: their CPU time
  is the difference between before and after.
- The machine is shared: the CPU time the whole machine spent outside the measured tree
  and the watched processes during the run is kept as `background_cpu_s`, so a noisy
  neighbour shows in the results instead of silently skewing them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

SERVER_MARKERS = (
    "pagesync.prefect.server_process",
    "prefect.server.api.server",
    "prefect server start",
)
MB = 1024 * 1024


@dataclass
class Measurement:
    """What one run of one command cost."""

    cmd: list[str]
    returncode: int
    wall_s: float
    started_at: float  # time.time() when the command was started
    exited_at: float  # time.time() when the command exited
    peak_rss_mb: float  # sum over the process tree, at its highest sample
    peak_rss_client_mb: float
    peak_rss_server_mb: float
    client_cpu_s: float  # the command's own process, user + system
    server_cpu_s: float  # a Prefect server the run started (--cold), 0 when there is none
    other_cpu_s: float  # any other descendant
    watched_cpu_s: dict[str, float] = field(default_factory=dict)  # e.g. {"api": 2.1}
    background_cpu_s: float = 0.0  # the rest of the machine during the run
    #: What the scenario read afterwards, e.g. from pagesync's page log: first_commit and
    #: last_commit (epoch seconds), pages.
    facts: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    log: str = ""  # where stdout and stderr went
    error: str | None = None  # set when the command failed: the tail of its output

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None

    @property
    def tree_cpu_s(self) -> float:
        return self.client_cpu_s + self.server_cpu_s + self.other_cpu_s

    @property
    def background_cores(self) -> float:
        """How many cores other processes kept busy, on average, during the run."""
        return self.background_cpu_s / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle or waiting on I/O)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def _role(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "client"
    cmdline = " ".join(proc.cmdline())
    return "server" if any(m in cmdline for m in SERVER_MARKERS) else "other"


class _Sampler(threading.Thread):
    """Polls the tree: peak RSS (total and per role) and each process's latest CPU time."""

    def __init__(self, root: psutil.Process, interval: float) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.root = root
        self.interval = interval
        self.halt = threading.Event()
        self.peak = {"total": 0, "client": 0, "server": 0, "other": 0}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, latest CPU seconds)
        self.roles: dict[int, str] = {}
        self.samples = 0

    def run(self) -> None:
        while True:
            self.sample()
            if self.halt.wait(self.interval):
                return

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = {"total": 0, "client": 0, "server": 0, "other": 0}
        for proc in procs:
            try:
                with proc.oneshot():
                    role = self.roles.get(proc.pid) or _role(proc, self.root.pid)
                    if role != "other":  # "other" may still be a fork about to exec
                        self.roles[proc.pid] = role
                    mem = proc.memory_info().rss
                    cpu = _cpu(proc.cpu_times())
            except psutil.Error:  # gone, or a zombie: its last sample stands
                continue
            rss["total"] += mem
            rss[role] += mem
            self.cpu[proc.pid] = (role, cpu)
        for key, value in rss.items():
            self.peak[key] = max(self.peak[key], value)
        self.samples += 1

    def last_cpu(self, role: str) -> float:
        return sum(cpu for r, cpu in self.cpu.values() if r == role)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (ours: only used on a timeout)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def measure(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    log: Path,
    watch: Mapping[str, psutil.Process] | None = None,
    interval: float = 0.05,
    timeout: float = 3600.0,
    cwd: Path | None = None,
) -> Measurement:
    """Run `cmd` to completion with stdout and stderr in `log`, and measure it."""
    watch = dict(watch or {})
    before = {name: _cpu(p.cpu_times()) for name, p in watch.items()}
    busy_before = _machine_busy()
    with open(log, "wb") as out:
        started_at = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
    root = psutil.Process(proc.pid)
    sampler = _Sampler(root, interval)
    sampler.start()
    timer = threading.Timer(timeout, kill_tree, args=(proc.pid,))
    timer.start()
    try:
        # Wait for the exit but leave the zombie: its CPU times are still readable.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - t0
        exited_at = time.time()
        busy = _machine_busy() - busy_before
    finally:
        timer.cancel()
        sampler.halt.set()
        sampler.join()
    times = root.cpu_times()
    client_cpu = _cpu(times)
    reaped_children = float(times.children_user + times.children_system)
    returncode = proc.wait()
    after = {name: _cpu(p.cpu_times()) for name, p in watch.items()}
    watched = {name: after[name] - before[name] for name in watch}
    other = sampler.last_cpu("other")
    if "server" in sampler.roles.values():
        # Exact when the command reaped its server (Prefect does at exit), else the last sample.
        server = max(sampler.last_cpu("server"), reaped_children - other)
    else:
        server, other = 0.0, max(other, reaped_children)
    error = None
    if returncode != 0:
        killed = " (killed on timeout)" if wall >= timeout else ""
        error = f"exit code {returncode}{killed}; last lines of {log}:\n{_tail(log)}"
    return Measurement(
        cmd=list(cmd),
        returncode=returncode,
        wall_s=wall,
        started_at=started_at,
        exited_at=exited_at,
        peak_rss_mb=sampler.peak["total"] / MB,
        peak_rss_client_mb=sampler.peak["client"] / MB,
        peak_rss_server_mb=sampler.peak["server"] / MB,
        client_cpu_s=client_cpu,
        server_cpu_s=server,
        other_cpu_s=other,
        watched_cpu_s=watched,
        background_cpu_s=max(0.0, busy - client_cpu - server - other - sum(watched.values())),
        samples=sampler.samples,
        log=str(log),
        error=error,
    )
