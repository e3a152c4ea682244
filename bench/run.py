"""pagesync benchmark: pagesync against a hand-written loop, on the bundled demo API.

    python bench/run.py                     # full, overhead, partitions, startup
    python bench/run.py --page-size 100     # the same at 100 records per page
    python bench/run.py --only memory       # 1,000,000 records: takes several minutes
    python bench/run.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
    python bench/run.py --only duckdb,mariadb --mysql mysql+pymysql://root@127.0.0.1:3306/test

Scenarios (`--only NAME[,NAME...]`):
  full        A: full sync, raw loop vs `pagesync run`, alternated, --rounds times each
  overhead    B: CPU per page with tiny pages and zero latency (marginal over a 1-page run)
  partitions  C: --partitions datetime partitions at --latency s per request, concurrency
              N vs 1
  startup     D: a one-page stream: wall time, and last commit -> process exit
  memory      E: peak RSS syncing --memory-records records (only when asked for)
  postgres    F: A with PostgreSQL as state and destination, vs a psycopg loop (needs
              --postgres)
  duckdb      G: A with one DuckDB file as state and destination, vs a duckdb loop
  mariadb     H: A with MariaDB as state and destination, vs a PyMySQL loop (needs --mysql)

Results: tables on stdout, everything measured in bench/results/<time>.json. The method
(what is measured and how) is in measure.py; the figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from harness import (
    BENCH,
    PREFECT_HOME,
    SERVER_HOME,
    DemoAPIProcess,
    DuckDB,
    MariaDB,
    Postgres,
    PrefectServer,
    commit_times,
    forget_history,
    items_stream,
    keep_as_template,
    local_server,
    pagesync_cmd,
    pagesync_env,
    partitioned_stream,
    plain_env,
    raw_cmd,
    remove_sqlite,
    sqlite_count,
    sqlite_url,
    stop_local_server,
    task_runs_recorded,
    write_config,
)
from measure import Measurement, measure

SCENARIOS = ("full", "overhead", "partitions", "startup", "memory", "postgres", "duckdb", "mariadb")
Target = Postgres | DuckDB | MariaDB
DEFAULT_SCENARIOS = ("full", "overhead", "partitions", "startup")
RESULTS = BENCH / "results"
Figures = dict[str, float | None]


# --------------------------------------------------------------------------- figures


def settle(
    process: psutil.Process, quiet: float = 0.02, window: float = 0.25, limit: float = 120.0
) -> float:
    """Wait until `process` (a Prefect server) uses under `quiet` of a core over `window`
    seconds, at most `limit` seconds; the CPU seconds it used meanwhile."""
    try:
        start = last = sum(process.cpu_times()[:2])
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(window)  # a sampling period: what is measured is the CPU in it
            now = sum(process.cpu_times()[:2])
            if now - last < quiet * window:
                break
            last = now
        return now - start
    except psutil.Error:  # it left (a run's own server)
        return 0.0


def server_cpu(m: Measurement) -> float:
    """The CPU of the Prefect server over the run: one the run started (`--cold`), or the
    one it used (pagesync's kept local server, or `--server`)."""
    return m.server_cpu_s + m.watched_cpu_s.get("server", 0.0)


def api_cpu(m: Measurement) -> float:
    return m.watched_cpu_s.get("api", 0.0)


def _phase(m: Measurement, start: str, end: str) -> float | None:
    """Seconds between two of the run's moments (started, first_commit, last_commit, exited)."""
    moments = {"started": m.started_at, "exited": m.exited_at, **m.facts}
    if start not in moments or end not in moments:
        return None
    return moments[end] - moments[start]


METRICS: dict[str, Callable[[Measurement], float | None]] = {
    "wall_s": lambda m: m.wall_s,
    "peak_rss_mb": lambda m: m.peak_rss_mb,
    "peak_rss_client_mb": lambda m: m.peak_rss_client_mb,
    "peak_rss_server_mb": lambda m: m.peak_rss_server_mb,
    "client_cpu_s": lambda m: m.client_cpu_s,
    "server_cpu_s": lambda m: server_cpu(m),
    "api_cpu_s": api_cpu,
    "total_cpu_s": lambda m: m.tree_cpu_s + api_cpu(m),
    "background_cores": lambda m: m.background_cores,
    "start_to_first_request_s": partial(_phase, start="started", end="first_request"),
    "sync_phase_s": partial(_phase, start="first_request", end="last_commit"),
    "start_to_first_commit_s": partial(_phase, start="started", end="first_commit"),
    "first_to_last_commit_s": partial(_phase, start="first_commit", end="last_commit"),
    "last_commit_to_exit_s": partial(_phase, start="last_commit", end="exited"),
}


def medians(runs: Sequence[Measurement]) -> Figures | None:
    """Median of every metric over the successful runs; None when none succeeded."""
    ok = [m for m in runs if m.ok]
    if not ok:
        return None
    out: Figures = {}
    for name, get in METRICS.items():
        values = [v for v in (get(m) for m in ok) if v is not None]
        out[name] = statistics.median(values) if values else None
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def get(figures: Figures | None, key: str) -> float | None:
    return None if figures is None else figures.get(key)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule])


def verdict(value: float | None, limit: float, unit: str = "", at_least: bool = False) -> str:
    sign = ">=" if at_least else "<="
    if value is None:
        return f"goal {sign} {limit:g}{unit}: not measured"
    met = value >= limit if at_least else value <= limit
    return f"goal {sign} {limit:g}{unit}: {'met' if met else 'NOT met'} ({value:.2f}{unit})"


# --------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    """Shared state of one benchmark invocation: options, work folder, results so far."""

    args: argparse.Namespace
    work: Path
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    warmed: bool = False
    server: PrefectServer | None = None
    report: dict[str, Any] = field(default_factory=dict)
    printed: list[str] = field(default_factory=list)

    @property
    def results_path(self) -> Path:
        return RESULTS / f"{self.started.strftime('%Y%m%dT%H%M%SZ')}.json"

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def show(self, text: str) -> None:
        """Print a result table and keep it for the JSON file."""
        self.printed.append(text)
        self.say()
        self.say(text)

    def save(self) -> None:
        RESULTS.mkdir(exist_ok=True)
        doc = {
            "started": self.started.isoformat(),
            "machine": machine(),
            "args": vars(self.args),
            "scenarios": self.report,
            "tables": self.printed,
        }
        self.results_path.write_text(json.dumps(doc, indent=2, default=str))

    # -- running things

    def measure(
        self,
        label: str,
        cmd: list[str],
        env: dict[str, str],
        api: DemoAPIProcess,
        *,
        prefect: bool = False,
    ) -> Measurement:
        """One measured run against `api`, whose request log is cleared first; with
        `prefect`, the running Prefect server's CPU (`--server`) is the run's too."""
        api.forget_requests()
        watch = {"api": api.process}
        if prefect and self.server is not None:
            watch["server"] = self.server.process
        elif prefect and not self.args.cold and (kept := local_server()) is not None:
            watch["server"] = kept
        m = measure(cmd, env, log=self.work / f"{label}.log", watch=watch,
                    timeout=self.args.timeout)  # fmt: skip
        if m.ok and (arrived := api.request_times()):
            m.facts["first_request"] = min(arrived)
        if "server" in watch:
            # The server records the run's last page task runs after the run exits: that
            # CPU is the run's, and left running it would slow the next run (the raw loop's).
            after = settle(watch["server"])
            m.watched_cpu_s["server"] = m.watched_cpu_s.get("server", 0.0) + after
            m.facts["server_cpu_after_exit_s"] = after
        return m

    def done(self, label: str, m: Measurement) -> None:
        """One progress line per run (and the error of a failed one)."""
        self.say(
            f"  {label:<26} {m.wall_s:7.2f} s  client {m.client_cpu_s:6.2f} s  "
            f"server {server_cpu(m):6.2f} s  api {api_cpu(m):5.2f} s  "
            f"RSS {m.peak_rss_mb:5.0f} MB  others {m.background_cores:4.2f} cores  "
            f"{'ok' if m.ok else 'FAILED'}"
        )
        if m.error:
            self.say("    " + m.error.replace("\n", "\n    "))

    def pagesync(
        self,
        label: str,
        api: DemoAPIProcess,
        streams: dict[str, dict[str, Any]],
        records: int,
        *,
        concurrency: int = 4,
        target: tuple[Target, str] | None = None,
    ) -> Measurement:
        """`pagesync run` of the first of `streams` on fresh databases (a new SQLite file,
        or a new PostgreSQL schema), checked to hold `records` rows, with its commit times
        read from its page log."""
        stream = next(iter(streams))
        db = self.work / f"{label}.db"
        remove_sqlite(db)
        if target:
            pg, schema = target
            state = pg.sqlalchemy_url(schema)
            count, commits = partial(pg.count, schema, stream), partial(pg.commit_times, schema)
        else:
            state = sqlite_url(db)
            count, commits = partial(sqlite_count, db, stream), partial(commit_times, db)
        config = write_config(self.work / f"{label}.yaml", base_url=api.url, streams=streams,
                              state=state, concurrency=concurrency)  # fmt: skip
        env = pagesync_env(cold=self.args.cold)
        if self.server is not None:
            env["PREFECT_API_URL"] = self.server.url
        m = self.measure(label, pagesync_cmd(stream, config), env, api, prefect=True)
        self.expect(m, count, records)
        if m.ok:
            times = [t.timestamp() for t in commits()]
            m.facts.update(pages=len(times), first_commit=times[0], last_commit=times[-1])
        remove_sqlite(db)
        self.done(label, m)
        return m

    def raw(
        self,
        label: str,
        api: DemoAPIProcess,
        page_size: int,
        records: int | None,
        *,
        target: tuple[Target, str] | None = None,
        max_pages: int | None = None,
    ) -> Measurement:
        """The raw loop into a new SQLite file or PostgreSQL schema; checked unless
        `records` is None."""
        db = self.work / f"{label}.db"
        remove_sqlite(db)
        if target:
            pg, schema = target
            where = pg.raw_args(schema)
            count = partial(pg.count, schema)
        else:
            where, count = ["--sqlite", str(db)], partial(sqlite_count, db)
        if max_pages is not None:
            where += ["--max-pages", str(max_pages)]
        m = self.measure(label, raw_cmd(api.first_page(page_size), *where), plain_env(), api)
        if records is not None:
            self.expect(m, count, records)
        if m.ok and (last := raw_last_commit(m.log)) is not None:
            m.facts["last_commit"] = last
        remove_sqlite(db)
        self.done(label, m)
        return m

    def expect(self, m: Measurement, count: Callable[[], int], wanted: int) -> None:
        """Fail the run unless the destination holds `wanted` rows."""
        if not m.ok:
            return
        try:
            got, why = count(), ""
        except Exception as exc:  # a missing table is a failed run, not a crash of the bench
            got, why = -1, f" ({exc})"
        if got != wanted:
            m.error = f"the destination holds {got} rows, expected {wanted}{why}"

    def warm(self, api: DemoAPIProcess) -> None:
        """Once per invocation: a one-page run, so PREFECT_HOME is migrated and warm, and
        (unless --keep-history) its server starts on an empty run history."""
        if self.warmed:
            return
        home = SERVER_HOME if self.args.server else PREFECT_HOME
        if self.args.keep_history or self.args.server:
            history = f"{task_runs_recorded(home):,} task runs kept from earlier benches"
        else:
            forget_history()
            history = "an empty run history"
        first = not (home / "prefect.db").exists()
        self.say(f"warm-up of {home}, {history}" + (" (first start: migrations)" if first else ""))
        for _ in range(2 if first and not self.args.server else 1):
            m = self.pagesync("warm-up", api, {"one": items_stream(10, single=True)}, 10)
            if not m.ok:
                raise SystemExit(f"pagesync does not run; see {m.log}")
            if first and not self.args.server:
                keep_as_template()  # stops the server: the second warm-up starts it again
                first = False
        self.warmed = True


def machine() -> dict[str, Any]:
    """Where and on what the figures were measured."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=BENCH, capture_output=True, text=True)
        except OSError:
            return ""
        return done.stdout.strip()

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "prefect": version("prefect"),
        "pagesync_commit": git("rev-parse", "--short", "HEAD"),
        "pagesync_modified": bool(git("status", "--porcelain", "--", "src", "flows", "tasks")),
    }


def dump(runs: dict[str, list[Measurement]]) -> dict[str, list[dict[str, Any]]]:
    return {k: [m.to_dict() for m in v] for k, v in runs.items()}


def walls(runs: dict[str, list[Measurement]]) -> str:
    """The wall time of every round, so the spread behind a median is visible."""
    parts = [
        f"{k} " + " ".join(f"{m.wall_s:.2f}" if m.ok else "FAILED" for m in ms)
        for k, ms in runs.items()
    ]
    return "wall time of each round (s): " + " | ".join(parts)


# --------------------------------------------------------------------------- scenarios


PHASE_ROWS = [
    ("  start -> first request (s)", "start_to_first_request_s"),
    ("  first request -> last commit: the sync (s)", "sync_phase_s"),
    ("  start -> first page committed (s)", "start_to_first_commit_s"),
    ("  first -> last page committed (s)", "first_to_last_commit_s"),
    ("  last page committed -> exit (s)", "last_commit_to_exit_s"),
]


#: Phases the raw loop has too: the whole command's start, and the sync itself.
RATIO_PHASES = frozenset({"start_to_first_request_s", "sync_phase_s"})


def compare_rows(raw: Figures | None, ps: Figures | None, records: int) -> list[list[str]]:
    """Rows of the raw-vs-pagesync tables (A, E, F)."""
    raw_rate = records / raw["wall_s"] if raw and raw["wall_s"] else None
    ps_rate = records / ps["wall_s"] if ps and ps["wall_s"] else None
    rows = [
        ["wall time (s)", fmt(get(raw, "wall_s")), fmt(get(ps, "wall_s")),
         ratio(get(ps, "wall_s"), get(raw, "wall_s"))],
        *([name, fmt(get(raw, key)), fmt(get(ps, key)),
           ratio(get(ps, key), get(raw, key)) if key in RATIO_PHASES else ""]
          for name, key in PHASE_ROWS),
        ["records/s", fmt(raw_rate, 0), fmt(ps_rate, 0), ratio(ps_rate, raw_rate)],
        ["peak RSS, process tree (MB)", fmt(get(raw, "peak_rss_mb"), 0),
         fmt(get(ps, "peak_rss_mb"), 0), ratio(get(ps, "peak_rss_mb"), get(raw, "peak_rss_mb"))],
    ]  # fmt: skip
    for name, key in [
        ("client CPU (s)", "client_cpu_s"),
        ("Prefect server CPU (s)", "server_cpu_s"),
        ("demo API CPU (s)", "api_cpu_s"),
        ("total CPU (s)", "total_cpu_s"),
    ]:
        a, b = get(raw, key), get(ps, key)
        rows.append([name, fmt(a), fmt(b), "" if key == "server_cpu_s" else ratio(b, a)])
    rows.append(["other processes on the machine (cores busy)",
                 fmt(get(raw, "background_cores")), fmt(get(ps, "background_cores")), ""])  # fmt: skip
    return rows


def scenario_full(b: Bench, *, pg: Target | None = None) -> None:
    """A (SQLite), F (PostgreSQL), G (DuckDB) or H (MariaDB): a full sync, raw loop and
    pagesync alternated, each on fresh databases."""
    a = b.args
    name = pg.label.lower().replace("postgresql", "postgres") if pg else "full"
    n, size = a.records, a.page_size
    pages = math.ceil(n / size)
    runs: dict[str, list[Measurement]] = {"raw": [], "pagesync": []}
    with DemoAPIProcess(n) as api:
        b.warm(api)
        b.say(f"\n{name}: {n:,} records, {size:,}/page ({pages:,} pages), {a.rounds} rounds")
        for r in range(1, a.rounds + 1):
            stream = {"items": items_stream(size)}
            if pg:
                with pg.schema() as schema:
                    runs["raw"].append(b.raw(f"{name}-raw-{r}", api, size, n, target=(pg, schema)))
                with pg.schema() as schema:
                    m = b.pagesync(f"{name}-pagesync-{r}", api, stream, n, target=(pg, schema))
            else:
                runs["raw"].append(b.raw(f"{name}-raw-{r}", api, size, n))
                m = b.pagesync(f"{name}-pagesync-{r}", api, stream, n)
            runs["pagesync"].append(m)
    raw, ps = medians(runs["raw"]), medians(runs["pagesync"])
    where = f"{pg.label} (state + destination)" if pg else "SQLite (state + destination, one file)"
    letter = {"PostgreSQL": "F", "DuckDB": "G", "MariaDB": "H"}[pg.label] if pg else "A"
    title = (f"{letter}. Full sync into {where}: {n:,} records, {size:,}/page, "
             f"checkpoint every page, medians of {a.rounds} rounds")  # fmt: skip
    text = table(title, ["", "raw loop", "pagesync", "pagesync/raw"], compare_rows(raw, ps, n))
    text += "\n" + walls(runs)
    wall_ratio = (
        ps["wall_s"] / raw["wall_s"] if raw and ps and ps["wall_s"] and raw["wall_s"] else None
    )
    limit = 1.5 if pg else 1.25 if size >= 1000 else 2.0 if size >= 100 else None
    if limit is not None:
        text += f"\nwall-time ratio pagesync/raw, {verdict(wall_ratio, limit, 'x')}"
    sync_ratio = _ratio_of(ps, raw, "sync_phase_s")
    sync_limit = 1.15 if size >= 1000 else 1.6 if size >= 100 else None
    if sync_limit is not None and not pg:
        text += f"\nsync-phase ratio pagesync/raw, {verdict(sync_ratio, sync_limit, 'x')}"
    b.show(text)
    b.report[f"{name}-{size}"] = {
        "records": n, "page_size": size, "pages": pages, "medians": {"raw": raw, "pagesync": ps},
        "wall_ratio": wall_ratio, "sync_ratio": sync_ratio, "runs": dump(runs),
    }  # fmt: skip


def _ratio_of(a: Figures | None, b: Figures | None, key: str) -> float | None:
    x, y = get(a, key), get(b, key)
    return x / y if x is not None and y else None


def raw_last_commit(log: Path | str) -> float | None:
    """The raw loop's last commit (Unix time), from the JSON line it prints at the end."""
    for line in reversed(Path(log).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line).get("last_commit")
    return None


def scenario_overhead(b: Bench) -> None:
    """B: per-page CPU, the marginal cost over a one-page run of the same page size."""
    a = b.args
    pages, size = a.overhead_pages, a.overhead_page_size
    n = pages * size
    runs: dict[str, list[Measurement]] = {
        k: [] for k in ("raw", "raw-1page", "pagesync", "pagesync-1page")
    }
    with DemoAPIProcess(n) as api:
        b.warm(api)
        b.say(
            f"\noverhead: {pages:,} pages of {size} records, and 1 page, API latency 0, {a.rounds} rounds"
        )
        for r in range(1, a.rounds + 1):
            runs["raw"].append(b.raw(f"overhead-raw-{r}", api, size, n))
            runs["raw-1page"].append(b.raw(f"overhead-raw-1page-{r}", api, size, size, max_pages=1))
            runs["pagesync"].append(
                b.pagesync(f"overhead-pagesync-{r}", api, {"items": items_stream(size)}, n)
            )
            one = {"items": items_stream(size, single=True)}
            runs["pagesync-1page"].append(
                b.pagesync(f"overhead-pagesync-1page-{r}", api, one, size)
            )
    med = {k: medians(v) for k, v in runs.items()}

    def per_page(kind: str, key: str) -> float | None:
        many, one = get(med[kind], key), get(med[f"{kind}-1page"], key)
        return None if many is None or one is None else (many - one) / (pages - 1) * 1000

    rows = []
    figures: dict[str, Figures] = {}
    for label, key in [
        ("client CPU (ms/page)", "client_cpu_s"),
        ("Prefect server CPU (ms/page)", "server_cpu_s"),
        ("demo API CPU (ms/page)", "api_cpu_s"),
        ("wall time (ms/page)", "wall_s"),
    ]:
        raw, ps = per_page("raw", key), per_page("pagesync", key)
        extra = None if raw is None or ps is None else ps - raw
        figures[key] = {"raw": raw, "pagesync": ps, "overhead": extra}
        rows.append([label, fmt(raw), fmt(ps), fmt(extra)])
    rows.append(["other processes on the machine (cores busy)",
                 fmt(get(med["raw"], "background_cores")),
                 fmt(get(med["pagesync"], "background_cores")), ""])  # fmt: skip
    title = (f"B. Cost per page: {pages:,} pages of {size} records, API latency 0, marginal over "
             f"a 1-page run ((X[{pages} pages] - X[1 page]) / {pages - 1}), medians of {a.rounds} rounds")  # fmt: skip
    text = table(title, ["", "raw loop", "pagesync", "pagesync - raw"], rows)
    one = med["pagesync-1page"]
    if one:
        text += (f"\nfixed cost of a 1-page pagesync run: wall {fmt(one['wall_s'])} s, client CPU "
                 f"{fmt(one['client_cpu_s'])} s, Prefect server CPU {fmt(one['server_cpu_s'])} s")  # fmt: skip
    text += "\n" + walls({k: v for k, v in runs.items() if "1page" not in k})
    overhead = figures["client_cpu_s"]["overhead"]
    text += f"\nclient CPU per page on top of the raw loop, {verdict(overhead, 3, ' ms')}"
    b.show(text)
    b.report["overhead"] = {
        "pages": pages, "page_size": size, "per_page_ms": figures, "medians": med, "runs": dump(runs),
    }  # fmt: skip


def scenario_partitions(b: Bench) -> None:
    """C: N datetime partitions against a slow API, at concurrency 1 and N."""
    a = b.args
    n, size, parts = a.partition_records, a.partition_page_size, a.partitions
    levels = {"concurrency 1": 1, f"concurrency {parts}": parts}
    runs: dict[str, list[Measurement]] = {k: [] for k in levels}
    imports: list[Measurement] = []
    stream = {"items": partitioned_stream(size, parts)}
    with DemoAPIProcess(n) as api:
        b.warm(api)
        api.set_latency(a.latency)
        b.say(f"\npartitions: {parts} partitions, {n:,} records, {size}/page, "
              f"latency {a.latency * 1000:.0f} ms, {a.rounds} rounds")  # fmt: skip
        try:
            for r in range(1, a.rounds + 1):
                imports.append(import_prefect(b, r))
                for key, c in levels.items():
                    runs[key].append(
                        b.pagesync(f"partitions-c{c}-{r}", api, stream, n, concurrency=c)
                    )
        finally:
            api.set_latency(0)
    one, many = (medians(v) for v in runs.values())
    pages = max((int(m.facts.get("pages", 0)) for v in runs.values() for m in v), default=0)
    rows = []
    for label, key, speed in [
        ("wall time (s)", "wall_s", True),
        *((name, k, k == "first_to_last_commit_s") for name, k in PHASE_ROWS),
        ("client CPU (s)", "client_cpu_s", False),
        ("Prefect server CPU (s)", "server_cpu_s", False),
        ("demo API CPU (s)", "api_cpu_s", False),
        ("other processes on the machine (cores busy)", "background_cores", False),
    ]:
        x, y = get(one, key), get(many, key)
        rows.append([label, fmt(x), fmt(y), ratio(x, y) if speed else ""])
    title = (f"C. Partitions: {parts} datetime partitions, {n:,} records, {size}/page ({pages} pages), "
             f"API latency {a.latency * 1000:.0f} ms, medians of {a.rounds} rounds")  # fmt: skip
    text = table(title, ["", *levels, "speed-up"], rows)
    text += "\n" + walls(runs)
    wall1, wall_n = get(one, "wall_s"), get(many, "wall_s")
    speedup = wall1 / wall_n if wall1 and wall_n else None
    text += f"\nwall-time speed-up, {verdict(speedup, 6, 'x', at_least=True)}"
    # What pagesync adds on top of Prefect's import, which every flow run's process pays
    # (issue 14): each round's wall times less the `import prefect` run just before them.
    own = {
        key: statistics.median(m.wall_s - i.wall_s for m, i in zip(v, imports, strict=True))
        for key, v in runs.items() if all(m.ok for m in v)
    }  # fmt: skip
    own1, own_n = own.get("concurrency 1"), own.get(f"concurrency {parts}")
    import_s = statistics.median(m.wall_s for m in imports)
    speedup_own = own1 / own_n if own1 and own_n else None
    text += (f"\nwall time less `import prefect` ({import_s:.2f} s, median): "
             f"{fmt(own1)} s against {fmt(own_n)} s, speed-up "
             f"{verdict(speedup_own, 6, 'x', at_least=True)}")  # fmt: skip
    b.show(text)
    b.report["partitions"] = {
        "partitions": parts, "records": n, "page_size": size, "latency_s": a.latency,
        "medians": {"1": one, str(parts): many}, "speedup_wall": speedup,
        "import_prefect_s": import_s, "speedup_less_import": speedup_own,
        "runs": dump({**runs, "import": imports}),
    }  # fmt: skip


def import_prefect(b: Bench, r: int) -> Measurement:
    """`python -c "import prefect"` in this venv: the part of a run's start that is Prefect's
    import, paid by any flow run's process (issue 14 judges what pagesync adds to it)."""
    m = measure([sys.executable, "-c", "import prefect"], plain_env(),
                log=b.work / f"import-prefect-{r}.log")  # fmt: skip
    b.done(f"import-prefect-{r}", m)
    return m


def scenario_startup(b: Bench) -> None:
    """D: a one-page stream, from process start to the last commit to process exit."""
    a = b.args
    size = a.startup_page_size
    runs: list[Measurement] = []
    imports: list[Measurement] = []
    with DemoAPIProcess(max(size, 1000)) as api:
        b.warm(api)
        b.say(f"\nstartup: a one-page stream of {size} records, {a.rounds} rounds")
        for r in range(1, a.rounds + 1):
            imports.append(import_prefect(b, r))
            one = {"items": items_stream(size, single=True)}
            runs.append(b.pagesync(f"startup-{r}", api, one, size))
    ok = [m for m in runs if m.ok]
    import_s = statistics.median(m.wall_s for m in imports)

    def spread(key: str) -> list[str]:
        values = [v for v in (METRICS[key](m) for m in ok) if v is not None]
        if not values:
            return ["-", "-", "-"]
        return [fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))]

    # Each round's own difference: the machine's speed drifts less within a round.
    firsts = [METRICS["start_to_first_request_s"](m) for m in runs]
    pairs = [f - i.wall_s for f, i, m in zip(firsts, imports, runs, strict=True)
             if m.ok and f is not None]  # fmt: skip
    paired = ([fmt(statistics.median(pairs)), fmt(min(pairs)), fmt(max(pairs))] if pairs
              else ["-", "-", "-"])  # fmt: skip
    rows = [
        ["wall time (s)", *spread("wall_s")],
        [
            "`python -c 'import prefect'` (s)",
            *(fmt(f(m.wall_s for m in imports)) for f in (statistics.median, min, max)),
        ],
        ["start -> first request (s)", *spread("start_to_first_request_s")],
        ["  less the `import prefect` just before it (s)", *paired],
        ["start -> page committed (s)", *spread("start_to_first_commit_s")],
        ["page committed -> process exit (s)", *spread("last_commit_to_exit_s")],
        ["client CPU (s)", *spread("client_cpu_s")],
        ["Prefect server CPU (s)", *spread("server_cpu_s")],
        ["peak RSS, process tree (MB)", *spread("peak_rss_mb")],
        ["other processes on the machine (cores busy)", *spread("background_cores")],
    ]
    title = (f"D. Start and finish: `pagesync run` of a one-page stream ({size} records), "
             f"warm Prefect home, {a.rounds} rounds")  # fmt: skip
    text = table(title, ["", "median", "min", "max"], rows)
    med = medians(runs)
    text += f"\nwall time, {verdict(get(med, 'wall_s'), 3, ' s')}"
    first = get(med, "start_to_first_request_s")
    overhead = None if first is None else first - import_s
    text += ("\nstart overhead (start -> first request, less `import prefect`), "
             f"{verdict(overhead, 0.5, ' s')}")  # fmt: skip
    text += f"\nlast commit -> exit, {verdict(get(med, 'last_commit_to_exit_s'), 0.2, ' s')}"
    b.show(text)
    b.report["startup"] = {
        "page_size": size, "medians": med, "import_prefect_s": import_s,
        "start_overhead_s": overhead, "start_overhead_paired_s": pairs, "runs": dump({"pagesync": runs, "import": imports}),
    }  # fmt: skip


def scenario_memory(b: Bench) -> None:
    """E: one raw run and one pagesync run over a large data set; peak RSS is the point."""
    a = b.args
    n, size = a.memory_records, a.page_size
    b.say(
        f"\nmemory: {n:,} records at {size:,}/page, one run each (the API takes a while to start)"
    )
    with DemoAPIProcess(n) as api:
        b.warm(api)
        runs = {
            "raw": [b.raw("memory-raw", api, size, n)],
            "pagesync": [b.pagesync("memory-pagesync", api, {"items": items_stream(size)}, n)],
        }
    raw, ps = medians(runs["raw"]), medians(runs["pagesync"])
    rows = compare_rows(raw, ps, n)
    at = next(i for i, r in enumerate(rows) if r[0].startswith("peak RSS")) + 1
    rows[at:at] = [
        ["  of which the client (MB)", fmt(get(raw, "peak_rss_client_mb"), 0),
         fmt(get(ps, "peak_rss_client_mb"), 0), ""],
        ["  of which the Prefect server (MB)", "", fmt(get(ps, "peak_rss_server_mb"), 0), ""],
    ]  # fmt: skip
    title = f"E. Memory: {n:,} records, {size:,}/page, one run each"
    text = table(title, ["", "raw loop", "pagesync", "pagesync/raw"], rows)
    text += f"\npeak RSS of pagesync's process tree, {verdict(get(ps, 'peak_rss_mb'), 300, ' MB')}"
    b.show(text)
    b.report["memory"] = {
        "records": n, "page_size": size, "medians": {"raw": raw, "pagesync": ps}, "runs": dump(runs),
    }  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--records", type=int, default=200_000, help="A, F: records (default 200,000)")
    add("--page-size", type=int, default=1000, help="A, E, F: records per page (default 1,000)")
    add("--rounds", type=int, default=3, help="runs of each kind, alternated (default 3)")
    add("--partitions", type=int, default=8, help="C: partitions (default 8)")
    add("--latency", type=float, default=0.05, help="C: API latency, seconds (default 0.05)")
    add("--partition-records", type=int, default=20_000, help="C: records (default 20,000)")
    add("--partition-page-size", type=int, default=100, help="C: records per page (default 100)")
    add("--overhead-pages", type=int, default=2000, help="B: pages (default 2,000)")
    add("--overhead-page-size", type=int, default=10, help="B: records per page (default 10)")
    add("--startup-page-size", type=int, default=100, help="D: records in the page (default 100)")
    add("--memory-records", type=int, default=1_000_000, help="E: records (default 1,000,000)")
    add("--postgres", metavar="URL", help="F: SQLAlchemy URL of a PostgreSQL database")
    add(
        "--mysql",
        metavar="URL",
        help="H: SQLAlchemy URL of a MySQL/MariaDB server (mysql+pymysql://...)",
    )
    add("--only", metavar="NAME[,NAME]", action="append",
        help=f"scenarios to run, of: {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT_SCENARIOS)}; "
             "and postgres with --postgres)")  # fmt: skip
    add("--timeout", type=float, default=3600, help="seconds before a run is killed")
    add("--keep", action="store_true", help="keep the work folder (configs, logs)")
    add("--server", action="store_true",
        help="run pagesync against a `prefect server start` started once for the bench (as "
             "under `pagesync up` or a worker) instead of pagesync's local server")  # fmt: skip
    add("--keep-history", action="store_true",
        help="keep the runs earlier benches left on the local server (by default each "
             "invocation starts it on an empty history: its recording cost grows with it)")  # fmt: skip
    add("--cold", action="store_true",
        help="every pagesync run starts (and stops) its own local Prefect server "
             "(PAGESYNC_SERVER_IDLE=0) instead of reusing the one kept since the warm-up")  # fmt: skip
    args = p.parse_args(argv)
    if args.only:
        chosen = {s.strip() for item in args.only for s in item.split(",") if s.strip()}
    else:
        chosen = {*DEFAULT_SCENARIOS, *(["postgres"] if args.postgres else [])}
    unknown = sorted(chosen - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if "postgres" in chosen and not args.postgres:
        p.error("the postgres scenario needs --postgres URL")
    if "mariadb" in chosen and not args.mysql:
        p.error("the mariadb scenario needs --mysql URL")
    if args.rounds < 1 or args.partitions < 1 or args.overhead_pages < 2:
        p.error("--rounds and --partitions must be >= 1, --overhead-pages >= 2")
    args.scenarios = [s for s in SCENARIOS if s in chosen]
    return args


def prefect_mode(args: argparse.Namespace) -> str:
    if args.server:
        return "`prefect server start`, started once (--server)"
    if args.cold:
        return "a local server started and stopped by each run (--cold)"
    return "pagesync's local server, started by the warm-up and kept between runs"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pagesync-bench-"))
    b = Bench(args, work)
    info = machine()
    load = ", ".join(f"{x:.1f}" for x in info["load_average"])
    b.say(f"pagesync bench, {b.started:%Y-%m-%d %H:%M} UTC, {info['cores']} cores ({info['cpu']}), "
          f"load average {load}; Python {info['python']}, Prefect {info['prefect']}, pagesync "
          f"{info['pagesync_commit']}{' (engine modified)' if info['pagesync_modified'] else ''}")  # fmt: skip
    b.say(f"scenarios: {', '.join(args.scenarios)}; work folder {work}; Prefect: "
          f"{prefect_mode(args)}")  # fmt: skip
    runners: dict[str, Callable[[], None]] = {
        "full": partial(scenario_full, b),
        "overhead": partial(scenario_overhead, b),
        "partitions": partial(scenario_partitions, b),
        "startup": partial(scenario_startup, b),
        "memory": partial(scenario_memory, b),
        "postgres": lambda: scenario_full(b, pg=Postgres(args.postgres)),
        "duckdb": lambda: scenario_full(b, pg=DuckDB(work)),
        "mariadb": lambda: scenario_full(b, pg=MariaDB(args.mysql)),
    }
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if args.server:
                b.server = stack.enter_context(PrefectServer())
                b.say(f"Prefect server for all runs: {b.server.url}")
            for name in args.scenarios:
                runners[name]()
                b.save()
    finally:
        if not args.server:
            stop_local_server()
        if args.keep:
            b.say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if len(b.printed) > 1:
        b.say(f"\nAll tables ({time.monotonic() - t0:.0f} s):")
        for text in b.printed:
            b.say()
            b.say(text)
    b.say(f"\nresults: {b.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
